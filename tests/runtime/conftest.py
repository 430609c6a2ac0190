"""Fixtures shared by the server's tests: the tiny model's tokenizer, and servers over a fake
engine core (tests/runtime/fake_core.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from tests.runtime.fake_core import FakeCore
from tests.runtime.test_server import Served

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ServeFake = Callable[..., tuple[Served, FakeCore]]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    from runtime.tiny import ensure_tiny

    return AutoTokenizer.from_pretrained(ensure_tiny(), local_files_only=True)


@pytest.fixture
def serve_fake(tok: PreTrainedTokenizerBase) -> Iterator[ServeFake]:
    """serve_fake(max_waiting=.., api_key=.., tokenizer=.., **FakeCore kwargs) -> a healthy
    (Served, core); the tiny model's tokenizer unless another is given."""
    servers: list[Served] = []

    def start(
        max_waiting: int = 0, api_key: str | None = None, tokenizer: Any = None, **core: Any
    ) -> tuple[Served, FakeCore]:
        fake = FakeCore(**core)
        served = Served(lambda: (fake, tokenizer or tok), max_waiting=max_waiting, api_key=api_key)
        servers.append(served)
        served.wait_healthy()
        return served, fake

    yield start
    for served in servers:
        served.close()
