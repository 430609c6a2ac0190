"""Shared fixtures: a reference server in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import torch

T = TypeVar("T")

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors, so the GPU
# attention backend's logic is tested here too. Set before any kernel is defined: @triton.jit
# reads it then.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass(frozen=True)
class RefServer:
    url: str
    truth_log: Path
    process: subprocess.Popen[str]


@pytest.fixture
def refserver(tmp_path: Path) -> Iterator[Callable[..., RefServer]]:
    """Start reference servers: refserver("--itl-ms", "10", ...) -> RefServer."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> RefServer:
        log = tmp_path / f"truth-{len(procs)}.jsonl"
        cmd = [sys.executable, "-m", "bench.refserver", "--port", "0", "--log-file", str(log)]
        proc = subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.match(r"READY (http://\S+)", line)
        assert match, f"refserver did not start: {line!r}"
        return RefServer(match.group(1), log, proc)

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The C kernels as on a machine without a C compiler (CC names nothing, and an empty
    kernel cache); later tests load the real build again."""
    from runtime import native

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "kernels"))
    native.load_kernels.cache_clear()
    yield
    native.load_kernels.cache_clear()


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Hugging Face tokenizer directory, built offline: one token per whitespace word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    corpus = [" ".join(f"w{i}" for i in range(j, j + 50)) for j in range(0, 500, 50)]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    path = tmp_path_factory.mktemp("word-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return path


def best_of(attempts: int, measure: Callable[[], T], passes: Callable[[T], bool]) -> T:
    """Measure up to `attempts` times and return the first result that passes (else the last).

    For timing checks with hard bounds on a shared machine: a neighbour can stall a process for
    milliseconds once, while a real regression fails every attempt.
    """
    result = measure()
    for _ in range(attempts - 1):
        if passes(result):
            break
        result = measure()
    return result


def git(repo: Path, *args: str) -> str:
    """`git -C repo ARGS...` as a test user without signing; its standard output."""
    done = subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.com",
         "-c", "commit.gpgsign=false", *args],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout
