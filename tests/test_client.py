"""The streaming client against the reference server: counts, attribution, failure rows."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import client
from bench.compose import compose
from bench.config import TargetConfig
from bench.workload import RequestSpec
from tests.conftest import RefServer

StartServer = Callable[..., RefServer]


def _target(base_url: str, **changes: object) -> TargetConfig:
    target = compose("target=openai", f"target.base_url={base_url}").target
    return dataclasses.replace(target, **changes)  # type: ignore[arg-type]


def _send(target: TargetConfig, prompt: list[int] | str, out: int, model: str = "refserver"):
    async def go() -> client.RequestResult:
        async with client.session(4, 30.0) as session:
            spec = RequestSpec(0, prompt, 8, out, 0.0)
            return await client.send(session, target, model, spec, 0.0)

    return asyncio.run(go())


def test_streamed_tokens_are_counted_from_usage(refserver: StartServer) -> None:
    url = refserver("--ttft-ms", "5", "--itl-ms", "1").url
    r = _send(_target(url), list(range(100, 108)), out=20)
    assert r.ok and r.error is None and r.http_status == 200
    assert (r.output_tokens, r.output_tokens_source, r.token_attribution) == (20, "usage", "usage")
    assert r.prompt_tokens == 8
    assert r.event_tokens == [1] * 20
    assert len(r.itl_s()) == 19


def test_several_tokens_per_event_are_attributed_from_usage_deltas(
    refserver: StartServer,
) -> None:
    url = refserver("--ttft-ms", "5", "--itl-ms", "2", "--tokens-per-event", "4").url
    r = _send(_target(url), list(range(100, 108)), out=18)
    assert r.output_tokens == 18
    assert r.event_tokens == [4, 4, 4, 4, 2]
    gaps = r.itl_s()
    # The first event's tokens have no predecessor; every later token gets its share of a gap.
    assert len(gaps) == 18 - 4
    assert gaps[0] == gaps[3]  # the four tokens of event 2 share its gap equally


def test_without_per_chunk_usage_events_are_recorded_honestly(refserver: StartServer) -> None:
    url = refserver("--ttft-ms", "5", "--itl-ms", "1", "--tokens-per-event", "4").url
    r = _send(_target(url, continuous_usage_stats=False), list(range(100, 108)), out=16)
    assert (r.output_tokens, r.output_tokens_source) == (16, "usage")
    assert r.token_attribution == "events"
    assert r.event_tokens == [1, 1, 1, 1]


def test_without_usage_deltas_a_local_tokenizer_attributes_tokens(
    refserver: StartServer, word_tokenizer: Path
) -> None:
    from transformers import AutoTokenizer

    url = refserver("--ttft-ms", "5", "--itl-ms", "1", "--tokens-per-event", "4").url
    tok = AutoTokenizer.from_pretrained(word_tokenizer, local_files_only=True)
    target = _target(url, continuous_usage_stats=False)

    async def go() -> client.RequestResult:
        async with client.session(1, 30.0) as session:
            spec = RequestSpec(0, [1, 2, 3], 3, 10, 0.0)
            return await client.send(session, target, "refserver", spec, 0.0, tok)

    r = asyncio.run(go())
    assert r.token_attribution == "tokenizer"
    assert r.event_tokens == [4, 4, 2]
    assert len(r.itl_s()) == 10 - 4


def test_chat_endpoint_streams_text_prompts(refserver: StartServer) -> None:
    url = refserver("--ttft-ms", "5", "--itl-ms", "1").url
    r = _send(_target(url, endpoint="chat"), "how fast is this server", out=12)
    assert r.ok and r.output_tokens == 12
    assert r.prompt_tokens == 5


def test_an_unknown_model_is_a_failed_row_with_its_status(refserver: StartServer) -> None:
    url = refserver().url
    r = _send(_target(url), [1, 2, 3], out=4, model="nope")
    assert not r.ok
    assert (r.error, r.http_status) == ("http", 404)
    assert r.error_message and "does not exist" in r.error_message


def test_overload_is_recorded_as_refused(refserver: StartServer) -> None:
    url = refserver("--max-concurrency", "1", "--ttft-ms", "300").url
    target = _target(url)

    async def two() -> list[client.RequestResult]:
        async with client.session(2, 30.0) as session:
            specs = [RequestSpec(i, [1, 2, 3], 3, 4, 0.0) for i in range(2)]
            first = asyncio.create_task(client.send(session, target, "refserver", specs[0], 0.0))
            await asyncio.sleep(0.1)
            second = await client.send(session, target, "refserver", specs[1], 0.0)
            return [await first, second]

    first, second = asyncio.run(two())
    assert first.ok
    assert (second.ok, second.error, second.http_status) == (False, "refused", 429)


def test_an_unreachable_server_is_a_connection_error() -> None:
    r = _send(_target("http://127.0.0.1:9"), [1, 2, 3], out=4)
    assert (r.ok, r.error, r.http_status) == (False, "connection", None)


def test_request_body_asks_for_exact_lengths_and_usage() -> None:
    target = _target("http://127.0.0.1:8000", extra_body={"temperature": 0})
    body = client.request_body(target, "m", RequestSpec(0, [5, 6], 2, 9, 0.0))
    assert body["max_tokens"] == 9 and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert body["prompt"] == [5, 6] and body["temperature"] == 0


@pytest.mark.parametrize("endpoint,path", [("completions", "/v1/completions"),
                                           ("chat", "/v1/chat/completions")])  # fmt: skip
def test_endpoint_paths(endpoint: str, path: str) -> None:
    assert client.endpoint_url(_target("http://h:1", endpoint=endpoint)) == "http://h:1" + path
