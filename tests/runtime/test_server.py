"""The OpenAI-compatible server: the HTTP contract that the harness and ordinary OpenAI clients
rely on.

Fast tests serve a `FakeCore` (the real scheduler and block manager, output token i = prompt
token i) with the tiny model's tokenizer, so every expected text and count follows from the
prompt. Slow tests serve the real tiny engine, in-process and as `python -m runtime serve`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.server import build_app, start_server
from tests.runtime.fake_core import FakeCore

if TYPE_CHECKING:
    from aiohttp import web
    from transformers import PreTrainedTokenizerBase

    from runtime.async_engine import EngineCore
    from tests.runtime.conftest import ServeFake  # the fixtures' module imports this one

MODEL = "fake"
SENTENCE = "The quick brown fox jumps over the lazy dog"
TIMEOUT_S = 10.0  # for anything that should take milliseconds; only a hang reaches it


# --- helpers: a server on its own event loop, and a blocking HTTP client ---------------------


class Served:
    """`build_app` + `start_server` on an event loop in a background thread, so that tests stay
    synchronous and the client (urllib, the openai SDK) is an ordinary blocking one."""

    def __init__(
        self,
        factory: Callable[[], tuple[EngineCore, PreTrainedTokenizerBase]],
        name: str = MODEL,
        max_waiting: int = 0,
        api_key: str | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        app = build_app(factory, name, max_waiting, api_key)
        started = asyncio.run_coroutine_threadsafe(
            start_server(app, "127.0.0.1", 0), self._loop
        ).result(TIMEOUT_S)
        self._runner: web.AppRunner = started[0]
        self.url: str = started[1]

    def wait_healthy(self, timeout_s: float = TIMEOUT_S) -> None:
        wait_until(lambda: get(self.url + "/health")[0] == 200, timeout_s)

    def close(self) -> None:
        cleanup = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        cleanup.result(TIMEOUT_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(TIMEOUT_S)
        self._loop.close()


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any  # parsed JSON, or the text when the body is not JSON
    headers: dict[str, str]


def _reply(status: int, raw: bytes, headers: Any) -> Reply:
    text = raw.decode()
    try:
        body = json.loads(text)
    except ValueError:
        body = text
    return Reply(status, body, dict(headers))


def _open(request: urllib.request.Request) -> Reply:
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return _reply(response.status, response.read(), response.headers)
    except urllib.error.HTTPError as error:
        return _reply(error.code, error.read(), error.headers)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    reply = _open(urllib.request.Request(url, headers=headers or {}))
    return reply.status, reply.body if isinstance(reply.body, str) else json.dumps(reply.body)


def get_json(url: str, headers: dict[str, str] | None = None) -> Reply:
    return _open(urllib.request.Request(url, headers=headers or {}))


def _post_request(
    url: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None
) -> urllib.request.Request:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    return urllib.request.Request(url, data=data, headers=headers, method="POST")


def post(url: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None) -> Reply:
    return _open(_post_request(url, body, headers))


def sse_data(lines: Iterator[bytes]) -> Iterator[str]:
    """The `data:` payloads of a server-sent event stream, in order."""
    for line in lines:
        text = line.decode().strip()
        if text.startswith("data:"):
            yield text[len("data:") :].strip()


def stream(url: str, body: dict[str, Any]) -> list[str]:
    """All `data:` payloads of a streamed response (which must be a 200)."""
    with urllib.request.urlopen(_post_request(url, body, None), timeout=TIMEOUT_S) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return list(sse_data(response))


def chunks(payloads: list[str]) -> list[dict[str, Any]]:
    """The JSON chunks of a stream, after checking that it ends with exactly one [DONE]."""
    assert payloads[-1] == "[DONE]"
    assert payloads.count("[DONE]") == 1
    return [json.loads(p) for p in payloads[:-1]]


def wait_until(condition: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.005)


def metric(url: str, sample_name: str, **labels: str) -> float:
    """One sample of /metrics, by its full sample name (e.g. `..._total`) and labels."""
    _, text = get(url + "/metrics")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and labels.items() <= sample.labels.items():
                return sample.value
    raise AssertionError(f"no sample {sample_name} {labels} in /metrics:\n{text}")


def echo(prompt_ids: list[int], n: int) -> list[int]:
    """FakeCore's first n output tokens for this prompt."""
    return [prompt_ids[i % len(prompt_ids)] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def send_raw(url: str, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a POST and return its socket unread, for the test to drop when it chooses."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + data)
    return sock


@pytest.fixture
def sentence_ids(tok: PreTrainedTokenizerBase) -> list[int]:
    ids: list[int] = tok.encode(SENTENCE)
    return ids


# --- loading, /health, /v1/models ------------------------------------------------------------


def test_health_is_503_while_loading_and_200_after(tok: PreTrainedTokenizerBase) -> None:
    gate = threading.Event()

    def factory() -> tuple[EngineCore, PreTrainedTokenizerBase]:
        gate.wait(TIMEOUT_S)
        return FakeCore(), tok

    served = Served(factory)
    try:
        assert get(served.url + "/health")[0] == 503
        loading = post(served.url + "/v1/completions", {"prompt": [5, 6], "max_tokens": 1})
        assert loading.status == 503
        assert loading.body["error"]["type"] == "service_unavailable"
        gate.set()
        served.wait_healthy()
        assert get(served.url + "/health") == (200, "ok")
    finally:
        gate.set()
        served.close()


def test_a_failed_load_keeps_health_at_503_and_says_why(tok: PreTrainedTokenizerBase) -> None:
    def factory() -> tuple[EngineCore, PreTrainedTokenizerBase]:
        raise OSError("no such checkpoint")

    served = Served(factory)
    try:
        wait_until(lambda: "no such checkpoint" in get(served.url + "/health")[1])
        assert get(served.url + "/health")[0] == 503
        reply = post(served.url + "/v1/completions", OK)
        assert reply.status == 503
        assert "no such checkpoint" in reply.body["error"]["message"]
    finally:
        served.close()


def test_models_lists_the_served_name_with_its_limits_load_breakdown_and_kernels(
    serve_fake: ServeFake,
) -> None:
    served, _ = serve_fake(max_model_len=200, vocab_size=2048)
    reply = get_json(served.url + "/v1/models")
    assert reply.status == 200
    assert reply.body["object"] == "list"
    [card] = reply.body["data"]
    assert (card["id"], card["object"]) == (MODEL, "model")
    assert card["max_model_len"] == 200
    assert card["vocab_size"] == 2048
    assert card["load_breakdown"] == {"read_s": 0.0}
    assert card["kernels"] == {"attention": "fake"}


# --- completions -----------------------------------------------------------------------------


def test_completion_echo_text_usage_and_length_finish(
    serve_fake: ServeFake, tok: PreTrainedTokenizerBase, sentence_ids: list[int]
) -> None:
    served, _ = serve_fake()
    n = len(sentence_ids) + 7  # past the prompt's end: the echo wraps around
    reply = post(served.url + "/v1/completions", {"model": MODEL, "prompt": sentence_ids,
                                                  "max_tokens": n})  # fmt: skip
    assert reply.status == 200
    body = reply.body
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL
    assert body["id"] == f"cmpl-{reply.headers['X-Request-Id']}"
    [choice] = body["choices"]
    assert choice["text"] == tok.decode(echo(sentence_ids, n))
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(sentence_ids), n)
    assert usage["total_tokens"] == len(sentence_ids) + n


def test_completion_accepts_a_text_prompt_and_defaults_to_16_tokens(
    serve_fake: ServeFake, tok: PreTrainedTokenizerBase, sentence_ids: list[int]
) -> None:
    served, _ = serve_fake()
    reply = post(served.url + "/v1/completions", {"prompt": SENTENCE})
    assert reply.status == 200
    assert reply.body["usage"]["prompt_tokens"] == len(sentence_ids)
    assert reply.body["choices"][0]["text"] == tok.decode(echo(sentence_ids, 16))


@pytest.mark.parametrize(
    "prompt", [[[5, 6, 7]], ["The quick"]], ids=["one-id-list-in-a-list", "one-string-in-a-list"]
)
def test_a_one_element_prompt_list_is_one_prompt(
    serve_fake: ServeFake, tok: PreTrainedTokenizerBase, prompt: list[Any]
) -> None:
    served, _ = serve_fake()
    ids = prompt[0] if isinstance(prompt[0], list) else tok.encode(prompt[0])
    reply = post(served.url + "/v1/completions", {"prompt": prompt, "max_tokens": 4})
    assert reply.status == 200
    assert reply.body["usage"]["prompt_tokens"] == len(ids)
    assert reply.body["choices"][0]["text"] == tok.decode(echo(ids, 4))


def test_eos_ends_the_request_unless_ignore_eos(
    serve_fake: ServeFake, tok: PreTrainedTokenizerBase
) -> None:
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    served, _ = serve_fake(eos_token_id=eos)
    url = served.url + "/v1/completions"
    prompt = [*tok.encode("one two"), eos, *tok.encode(" three")]
    stopped = post(url, {"prompt": prompt, "max_tokens": 10}).body
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == prompt.index(eos) + 1  # EOS is counted
    assert stopped["choices"][0]["text"] == "one two"  # and not shown
    ignored = post(url, {"prompt": prompt, "max_tokens": 10, "ignore_eos": True}).body
    assert ignored["choices"][0]["finish_reason"] == "length"
    assert ignored["usage"]["completion_tokens"] == 10


def test_final_usage_carries_server_timings_that_add_up(
    serve_fake: ServeFake, sentence_ids: list[int]
) -> None:
    served, _ = serve_fake(step_s=0.002)
    reply = post(served.url + "/v1/completions", {"prompt": sentence_ids, "max_tokens": 5})
    timings = reply.body["usage"]["timings"]
    assert set(timings) == {"queue_ms", "prefill_ms", "decode_ms", "e2e_ms"}
    assert all(value >= 0 for value in timings.values())
    assert timings["prefill_ms"] >= 2.0  # at least the one step that sampled the first token
    assert timings["decode_ms"] >= 4 * 2.0  # the four steps after it
    parts = timings["queue_ms"] + timings["prefill_ms"] + timings["decode_ms"]
    assert parts == pytest.approx(timings["e2e_ms"], abs=1.0)


def test_request_id_header_is_echoed(serve_fake: ServeFake) -> None:
    served, _ = serve_fake()
    reply = post(served.url + "/v1/completions", {"prompt": [7, 8], "max_tokens": 1},
                 headers={"X-Request-Id": "abc123"})  # fmt: skip
    assert reply.headers["X-Request-Id"] == "abc123"
    assert reply.body["id"] == "cmpl-abc123"


# --- streaming -------------------------------------------------------------------------------


def test_stream_text_equals_the_non_streamed_text_and_ends_with_usage_then_done(
    serve_fake: ServeFake, sentence_ids: list[int]
) -> None:
    served, _ = serve_fake()
    request = {"prompt": sentence_ids, "max_tokens": 20}
    whole = post(served.url + "/v1/completions", request).body
    events = chunks(stream(served.url + "/v1/completions", {
        **request, "stream": True, "stream_options": {"include_usage": True}
    }))  # fmt: skip
    *text_chunks, usage_chunk = events
    assert all(c["object"] == "text_completion" for c in events)
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    assert all("usage" not in c for c in text_chunks)  # only with continuous_usage_stats
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(sentence_ids), 20)
    assert set(usage["timings"]) == {"queue_ms", "prefill_ms", "decode_ms", "e2e_ms"}


def test_stream_without_include_usage_has_no_usage_chunk(
    serve_fake: ServeFake, sentence_ids: list[int]
) -> None:
    served, _ = serve_fake()
    events = chunks(stream(served.url + "/v1/completions",
                           {"prompt": sentence_ids, "max_tokens": 4, "stream": True}))  # fmt: skip
    assert events and all(len(c["choices"]) == 1 and "usage" not in c for c in events)


def test_continuous_usage_gives_one_chunk_per_token_with_running_counts(
    serve_fake: ServeFake, sentence_ids: list[int]
) -> None:
    served, _ = serve_fake()
    n = 12
    events = chunks(stream(served.url + "/v1/completions", {
        "prompt": sentence_ids, "max_tokens": n, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }))  # fmt: skip
    assert all("usage" in c for c in events)
    token_chunks = [c for c in events if c["choices"]]
    # The harness times every token from these chunks: exactly one per token, counted up.
    assert [c["usage"]["completion_tokens"] for c in token_chunks] == list(range(1, n + 1))
    assert events[-1]["usage"]["completion_tokens"] == n
    assert all(c["usage"]["prompt_tokens"] == len(sentence_ids) for c in events)
    assert "timings" in token_chunks[-1]["usage"]  # the chunk that carries finish_reason
    assert all("timings" not in c["usage"] for c in token_chunks[:-1])


def test_stream_never_sends_a_partial_multibyte_character(
    serve_fake: ServeFake, tok: PreTrainedTokenizerBase
) -> None:
    served, _ = serve_fake()
    prompt_ids = tok.encode("Grüße, 東京 😀 ok")
    assert len(prompt_ids) > len("Grüße, 東京 😀 ok")  # some characters span several tokens
    events = chunks(stream(served.url + "/v1/completions", {
        "prompt": prompt_ids, "max_tokens": len(prompt_ids), "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }))  # fmt: skip
    texts = [c["choices"][0]["text"] for c in events if c["choices"]]
    assert len(texts) == len(prompt_ids)  # a chunk per token, even one with no text yet
    assert "".join(texts) == "Grüße, 東京 😀 ok"
    assert not any("\ufffd" in t for t in texts)


# --- chat ------------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "The quick brown fox"}]


def chat_prompt_ids(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids: list[int] = tok.encode(text, add_special_tokens=False)
    return ids


def test_chat_completion_object_echo_content_and_prompt_tokens(
    serve_fake: ServeFake, tok: PreTrainedTokenizerBase
) -> None:
    served, _ = serve_fake()
    prompt_ids = chat_prompt_ids(tok, MESSAGES)
    reply = post(served.url + "/v1/chat/completions",
                 {"model": MODEL, "messages": MESSAGES, "max_tokens": 12})  # fmt: skip
    assert reply.status == 200
    body = reply.body
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    expected = tok.decode(echo(prompt_ids, 12), skip_special_tokens=True)
    assert choice["message"]["content"] == expected
    assert choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert body["usage"]["completion_tokens"] == 12


def test_chat_text_content_parts_are_joined_by_newlines(
    serve_fake: ServeFake, tok: PreTrainedTokenizerBase
) -> None:
    served, _ = serve_fake()
    parts = [{"type": "text", "text": "The quick"}, {"type": "text", "text": "brown fox"}]
    reply = post(served.url + "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": parts}], "max_tokens": 1})  # fmt: skip
    joined = [{"role": "user", "content": "The quick\nbrown fox"}]
    assert reply.body["usage"]["prompt_tokens"] == len(chat_prompt_ids(tok, joined))


def test_chat_without_max_tokens_uses_the_rest_of_the_context(
    serve_fake: ServeFake, tok: PreTrainedTokenizerBase
) -> None:
    served, _ = serve_fake(max_model_len=64)
    reply = post(served.url + "/v1/chat/completions", {"messages": MESSAGES})
    assert reply.body["usage"]["completion_tokens"] == 64 - len(chat_prompt_ids(tok, MESSAGES))


def test_chat_stream_chunks_start_with_the_assistant_role(
    serve_fake: ServeFake, tok: PreTrainedTokenizerBase
) -> None:
    served, _ = serve_fake()
    request = {"messages": MESSAGES, "max_completion_tokens": 12}
    whole = post(served.url + "/v1/chat/completions", request).body
    events = chunks(stream(served.url + "/v1/chat/completions", {
        **request, "stream": True, "stream_options": {"include_usage": True}
    }))  # fmt: skip
    *deltas, usage_chunk = events
    assert all(c["object"] == "chat.completion.chunk" for c in events)
    assert deltas[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in deltas[1:])
    content = "".join(c["choices"][0]["delta"]["content"] for c in deltas)
    assert content == whole["choices"][0]["message"]["content"]
    assert usage_chunk["usage"]["prompt_tokens"] == len(chat_prompt_ids(tok, MESSAGES))
    assert usage_chunk["usage"]["completion_tokens"] == 12


# --- errors ----------------------------------------------------------------------------------

OK = {"prompt": [5, 6, 7], "max_tokens": 2}


def _case(case_id: str, body: dict[str, Any] | bytes, param: str, chat: bool = False) -> Any:
    return pytest.param("chat/completions" if chat else "completions", body, param, id=case_id)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        _case("malformed-json", b"{not json", "body"),
        _case("body-not-an-object", b"[1, 2]", "body"),
        _case("max_tokens-negative", {**OK, "max_tokens": -1}, "max_tokens"),
        _case("max_tokens-zero", {**OK, "max_tokens": 0}, "max_tokens"),
        _case("max_tokens-past-max_model_len", {**OK, "max_tokens": 10_000}, "max_tokens"),
        _case("max_tokens-float", {**OK, "max_tokens": 1.5}, "max_tokens"),
        _case("max_tokens-bool", {**OK, "max_tokens": True}, "max_tokens"),
        _case("prompt-past-max_model_len", {"prompt": [5] * 300, "max_tokens": 1}, "prompt"),
        _case("prompt-leaves-no-room", {"prompt": [5] * 256, "max_tokens": 1}, "prompt"),
        _case("prompt-empty-string", {"prompt": "", "max_tokens": 1}, "prompt"),
        _case("prompt-empty-list", {"prompt": [], "max_tokens": 1}, "prompt"),
        _case("prompt-negative-id", {"prompt": [1, -2], "max_tokens": 1}, "prompt"),
        _case("prompt-batch", {"prompt": ["a", "b"], "max_tokens": 1}, "prompt"),
        _case("prompt-missing", {"max_tokens": 1}, "prompt"),
        _case("temperature-string", {**OK, "temperature": "hot"}, "temperature"),
        _case("temperature-negative", {**OK, "temperature": -0.5}, "temperature"),
        _case("stream-string", {**OK, "stream": "yes"}, "stream"),
        _case("top_p-above-1", {**OK, "top_p": 2}, "top_p"),
        _case("top_p-zero", {**OK, "top_p": 0}, "top_p"),
        _case("top_k-below-minus-1", {**OK, "top_k": -2}, "top_k"),
        _case("n-2", {**OK, "n": 2}, "n"),
        _case("logprobs-unsupported", {**OK, "logprobs": 5}, "logprobs"),
        _case("stop-empty", {**OK, "stop": ""}, "stop"),
        _case("stop-not-strings", {**OK, "stop": [1]}, "stop"),
        _case("stop_token_ids-negative", {**OK, "stop_token_ids": [-1]}, "stop_token_ids"),
        _case(
            "stream_options-without-stream",
            {**OK, "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        _case("messages-missing", {"max_tokens": 2}, "messages", chat=True),
        _case("messages-empty", {"messages": [], "max_tokens": 2}, "messages", chat=True),
        _case(
            "messages-no-role",
            {"messages": [{"content": "hi"}], "max_tokens": 2},
            "messages",
            chat=True,
        ),
        _case(
            "max_completion_tokens-zero",
            {"messages": MESSAGES, "max_completion_tokens": 0},
            "max_completion_tokens",
            chat=True,
        ),
    ],
)
def test_bad_request_is_400_with_an_openai_error_naming_the_param(
    serve_fake: ServeFake, path: str, body: dict[str, Any] | bytes, param: str
) -> None:
    served, core = serve_fake()
    reply = post(f"{served.url}/v1/{path}", body)
    assert reply.status == 400, reply.body
    error = reply.body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert not core.seqs and not core.scheduler.has_work  # nothing reached the engine


def test_wrong_model_is_404_model_not_found(serve_fake: ServeFake) -> None:
    served, _ = serve_fake()
    reply = post(served.url + "/v1/completions", {**OK, "model": "gpt-4"})
    assert reply.status == 404
    assert reply.body["error"]["code"] == "model_not_found"
    assert reply.body["error"]["param"] == "model"
    assert MODEL in reply.body["error"]["message"]  # says which model is served


def test_api_key_guards_v1_but_not_health(serve_fake: ServeFake) -> None:
    served, _ = serve_fake(api_key="sekrit")
    url = served.url + "/v1/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
        reply = post(url, OK, headers)
        assert reply.status == 401, headers
        assert reply.body["error"]["code"] == "invalid_api_key"
    assert get_json(served.url + "/v1/models").status == 401
    assert post(url, OK, {"Authorization": "Bearer sekrit"}).status == 200
    assert get(served.url + "/health")[0] == 200


# --- admission, disconnects, failures --------------------------------------------------------


def test_a_request_past_max_waiting_gets_429_while_the_rest_are_served(
    serve_fake: ServeFake,
) -> None:
    served, core = serve_fake(max_waiting=1, max_num_seqs=1, step_s=0.01, max_model_len=1024)
    url = served.url + "/v1/completions"
    long = {"prompt": [5, 6, 7], "max_tokens": 1000, "stream": True}
    # The pool is entered first so that it is left last: after the long stream is closed.
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        urllib.request.urlopen(_post_request(url, long, None), timeout=TIMEOUT_S) as running,
    ):
        next(sse_data(running))  # its first token: it holds the only batch slot
        waiting = pool.submit(post, url, {"prompt": [8, 9], "max_tokens": 3})
        wait_until(lambda: metric(served.url, "vllm:num_requests_waiting") == 1)
        refused = post(url, {"prompt": [8, 9], "max_tokens": 3})
        assert refused.status == 429
        assert refused.body["error"]["type"] == "rate_limit_error"
        assert refused.body["error"]["code"] == "rate_limit_exceeded"
        # A stream is refused the same way: its headers wait for its first token.
        refused_stream = post(url, {"prompt": [8, 9], "max_tokens": 3, "stream": True})
        assert refused_stream.status == 429
        assert refused_stream.body["error"]["type"] == "rate_limit_error"
    # The long stream is closed above, which frees the slot for the waiting request.
    served_later = waiting.result(TIMEOUT_S)
    assert served_later.status == 200
    assert served_later.body["usage"]["completion_tokens"] == 3
    assert len(core.aborted) == 1  # the long one; the refused one never reached the core


def test_concurrent_burst_past_max_waiting_gets_some_429s(serve_fake: ServeFake) -> None:
    served, _ = serve_fake(max_waiting=1, max_num_seqs=1, step_s=0.005)
    url = served.url + "/v1/completions"
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda _: post(url, {"prompt": [5, 6], "max_tokens": 8}),
                                range(6)))  # fmt: skip
    statuses = sorted(r.status for r in replies)
    assert set(statuses) == {200, 429}, statuses
    assert all(r.body["usage"]["completion_tokens"] == 8 for r in replies if r.status == 200)
    assert all(r.body["error"]["type"] == "rate_limit_error" for r in replies if r.status == 429)


def test_client_disconnect_aborts_the_request_and_frees_its_blocks(
    serve_fake: ServeFake, sentence_ids: list[int]
) -> None:
    served, core = serve_fake(step_s=0.01, max_model_len=2048, num_kv_blocks=512)
    url = served.url + "/v1/completions"
    body = {"prompt": sentence_ids, "max_tokens": 1000, "stream": True}
    with urllib.request.urlopen(_post_request(url, body, None), timeout=TIMEOUT_S) as response:
        events = sse_data(response)
        next(events), next(events)
        assert core.blocks.usage > 0  # it is running, holding its KV blocks
    wait_until(lambda: len(core.aborted) == 1)
    wait_until(lambda: core.blocks.usage == 0 and not core.scheduler.has_work)
    assert core.blocks.num_free_blocks == len(core.blocks.blocks)
    assert metric(served.url, "vllm:request_success_total", finished_reason="abort") == 1
    after = post(url, {"prompt": sentence_ids, "max_tokens": 3})
    assert after.status == 200 and after.body["usage"]["completion_tokens"] == 3


def test_dropping_a_non_streamed_request_aborts_it(serve_fake: ServeFake) -> None:
    served, core = serve_fake(step_s=0.01, max_model_len=1024)
    sock = send_raw(served.url, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 1000})
    wait_until(lambda: core.blocks.usage > 0)  # running
    sock.close()
    wait_until(lambda: len(core.aborted) == 1 and not core.scheduler.has_work)
    assert core.blocks.usage == 0


def test_dropping_a_queued_request_removes_it_from_the_queue(serve_fake: ServeFake) -> None:
    served, core = serve_fake(max_num_seqs=1, step_s=0.01, max_model_len=1024)
    url = served.url + "/v1/completions"
    long = {"prompt": [5, 6, 7], "max_tokens": 1000, "stream": True}
    with urllib.request.urlopen(_post_request(url, long, None), timeout=TIMEOUT_S) as running:
        next(sse_data(running))
        queued = send_raw(served.url, "/v1/completions", {"prompt": [8, 9], "max_tokens": 4})
        wait_until(lambda: len(core.scheduler.waiting) == 1)
        queued.close()
        wait_until(lambda: len(core.aborted) == 1 and not core.scheduler.waiting)
        assert len(core.scheduler.running) == 1  # the running request is untouched
        assert len(list(itertools.islice(sse_data(running), 3))) == 3
    wait_until(lambda: len(core.aborted) == 2 and core.blocks.usage == 0)


def test_concurrent_streams_each_get_their_own_output(
    serve_fake: ServeFake, tok: PreTrainedTokenizerBase
) -> None:
    served, _ = serve_fake(max_num_seqs=4, step_s=0.001)  # 8 requests: half of them queue
    url = served.url + "/v1/completions"
    prompts = [tok.encode(f"request {i} says {word}") for i, word in enumerate(
        ["model", "server", "token", "batch", "cache", "block", "queue", "user"]
    )]  # fmt: skip

    def text(prompt: list[int]) -> str:
        events = chunks(stream(url, {"prompt": prompt, "max_tokens": 10, "stream": True}))
        return "".join(c["choices"][0]["text"] for c in events)

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(text, prompts))
    assert texts == [tok.decode(echo(p, 10)) for p in prompts]


def test_preempted_requests_still_return_their_own_output(
    serve_fake: ServeFake, tok: PreTrainedTokenizerBase
) -> None:
    # 4 requests of 8 + 24 tokens need 8 blocks of 4 each; 16 blocks force preemptions.
    served, _ = serve_fake(num_kv_blocks=16, block_size=4, max_num_seqs=4, step_s=0.001)
    url = served.url + "/v1/completions"
    prompts = [[10 + i, 20, 30, 40, 50, 60, 70, 80 + i] for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: post(url, {"prompt": p, "max_tokens": 24}), prompts))
    assert [r.body["choices"][0]["text"] for r in replies] == [
        tok.decode(echo(p, 24)) for p in prompts
    ]
    assert metric(served.url, "vllm:num_preemptions_total") > 0


def test_engine_failure_fails_the_request_with_500_and_health_turns_503(
    serve_fake: ServeFake,
) -> None:
    served, core = serve_fake()
    core.fail_next_step = True
    reply = post(served.url + "/v1/completions", OK)
    assert reply.status == 500
    assert reply.body["error"]["type"] == "internal_server_error"
    assert "simulated failure" in reply.body["error"]["message"]
    assert get(served.url + "/health")[0] == 503
    assert post(served.url + "/v1/completions", OK).status == 500  # refused at once, no hang


def test_engine_failure_mid_stream_ends_it_with_an_error_event(
    serve_fake: ServeFake, sentence_ids: list[int]
) -> None:
    served, core = serve_fake(step_s=0.01, max_model_len=1024)
    body = {"prompt": sentence_ids, "max_tokens": 500, "stream": True}
    request = _post_request(served.url + "/v1/completions", body, None)
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        events = sse_data(response)
        next(events)
        core.fail_next_step = True
        rest = list(events)
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["type"] == "internal_server_error"
    assert "simulated failure" in error["message"]


# --- stop strings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stop",
    ["fox", "brown fo", ["lazy", "jumps"]],
    ids=["one-token", "spans-tokens", "earliest-of-two"],
)
def test_stop_string_cuts_the_output_in_both_modes_and_aborts_the_request(
    serve_fake: ServeFake, tok: PreTrainedTokenizerBase, sentence_ids: list[int],
    stop: str | list[str],
) -> None:  # fmt: skip
    served, core = serve_fake()
    url = served.url + "/v1/completions"
    full = tok.decode(sentence_ids)
    assert full == SENTENCE
    cut = min(full.index(s) for s in ([stop] if isinstance(stop, str) else stop))
    request = {"prompt": sentence_ids, "max_tokens": 100, "stop": stop}
    whole = post(url, request).body
    assert whole["choices"][0]["text"] == full[:cut]
    assert whole["choices"][0]["finish_reason"] == "stop"
    # Held-back text is never sent and retracted: the chunks add up to exactly the cut text.
    events = chunks(stream(url, {**request, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in events) == full[:cut]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    wait_until(lambda: len(core.aborted) == 2)  # max_tokens not reached: both were aborted
    assert core.blocks.usage == 0


def test_stop_token_ids_end_the_request_in_the_engine(
    serve_fake: ServeFake, tok: PreTrainedTokenizerBase, sentence_ids: list[int]
) -> None:
    served, core = serve_fake()
    body = {"prompt": sentence_ids, "max_tokens": 100, "stop_token_ids": [sentence_ids[3]]}
    choice = post(served.url + "/v1/completions", body).body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == tok.decode(sentence_ids[:4])  # the stop token's text is kept
    assert core.aborted == []


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_counters_equal_the_usage_the_responses_reported(
    serve_fake: ServeFake, sentence_ids: list[int]
) -> None:
    served, _ = serve_fake()
    url = served.url + "/v1/completions"
    usages = [
        post(url, {"prompt": sentence_ids, "max_tokens": 5}).body["usage"],
        post(url, {"prompt": [9, 10, 11], "max_tokens": 9}).body["usage"],
        chunks(stream(url, {"prompt": [4, 5], "max_tokens": 3, "stream": True,
                            "stream_options": {"include_usage": True}}))[-1]["usage"],
    ]  # fmt: skip
    stopped = post(url, {"prompt": sentence_ids, "max_tokens": 20, "stop": "brown"}).body["usage"]
    usages.append(stopped)

    assert metric(served.url, "vllm:prompt_tokens_total", model_name=MODEL) == sum(
        u["prompt_tokens"] for u in usages
    )
    assert metric(served.url, "vllm:generation_tokens_total", model_name=MODEL) == sum(
        u["completion_tokens"] for u in usages
    )
    assert metric(served.url, "vllm:request_success_total", finished_reason="length") == 3
    assert metric(served.url, "vllm:request_success_total", finished_reason="stop") == 1
    assert metric(served.url, "vllm:time_to_first_token_seconds_count") == 4
    assert metric(served.url, "vllm:e2e_request_latency_seconds_count") == 4
    assert metric(served.url, "vllm:time_per_output_token_seconds_count") == sum(
        u["completion_tokens"] - 1 for u in usages
    )
    wait_until(lambda: metric(served.url, "vllm:num_requests_running") == 0)
    assert metric(served.url, "vllm:num_requests_waiting", model_name=MODEL) == 0
    assert metric(served.url, "vllm:kv_cache_usage_perc") == 0
    assert metric(served.url, "vllm:num_preemptions_total") == 0


def test_metrics_report_the_kv_cache_size_as_vllms_cache_config_info(
    serve_fake: ServeFake,
) -> None:
    served, _ = serve_fake(num_kv_blocks=48, block_size=4)

    assert metric(served.url, "vllm:cache_config_info", num_gpu_blocks="48", block_size="4") == 1


# --- the real tiny engine (slow) -------------------------------------------------------------


@dataclass(frozen=True)
class TinyServer:
    url: str
    tok: PreTrainedTokenizerBase
    greedy_ids: list[int]  # Engine.generate's greedy output for PROMPT, before serving


TINY_PROMPT = "The server"


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[TinyServer]:
    from runtime.__main__ import load
    from runtime.config import EngineConfig
    from runtime.sequence import SamplingParams

    cfg = EngineConfig(model="tiny", max_model_len=256, num_kv_blocks=64, max_num_seqs=16)
    engine, tok = load(cfg, None)
    # The offline reference runs before the engine thread owns the engine.
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    [ids] = engine.generate([tok.encode(TINY_PROMPT)], greedy)
    served = Served(lambda: (engine, tok), name="tiny")
    served.wait_healthy()
    yield TinyServer(served.url, tok, ids)
    served.close()


@pytest.mark.slow
def test_openai_sdk_completion_returns_the_requested_tokens(tiny_server: TinyServer) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(
        model="tiny", prompt=TINY_PROMPT, max_tokens=8, extra_body={"ignore_eos": True}
    )
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 8
    assert completion.usage.prompt_tokens == len(tiny_server.tok.encode(TINY_PROMPT))
    assert completion.choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list()] == ["tiny"]


@pytest.mark.slow
def test_openai_sdk_chat_stream_yields_content_and_final_usage(tiny_server: TinyServer) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)
    events = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=10,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))  # fmt: skip
    content = [e.choices[0].delta.content for e in events if e.choices]
    assert any(content)
    assert events[0].choices[0].delta.role == "assistant"
    final = events[-1]
    assert final.choices == [] and final.usage is not None
    assert final.usage.completion_tokens == 10


@pytest.mark.slow
def test_a_seeded_sampled_completion_is_repeatable(tiny_server: TinyServer) -> None:
    body = {"prompt": TINY_PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 1234,
            "ignore_eos": True}  # fmt: skip
    texts = [post(tiny_server.url + "/v1/completions", body).body["choices"][0]["text"]
             for _ in range(2)]  # fmt: skip
    other = post(tiny_server.url + "/v1/completions", {**body, "seed": 4321}).body
    assert texts[0] == texts[1]
    assert other["choices"][0]["text"] != texts[0]  # the seed is used, not ignored


@pytest.mark.slow
def test_prompt_ids_outside_the_vocabulary_are_a_400_from_the_engine(
    tiny_server: TinyServer,
) -> None:
    reply = post(tiny_server.url + "/v1/completions", {"prompt": [5, 99_999], "max_tokens": 2})
    assert reply.status == 400
    assert reply.body["error"]["param"] == "prompt"
    assert "2048" in reply.body["error"]["message"]  # says what the valid range is
    assert get(tiny_server.url + "/health")[0] == 200  # and the engine is unharmed


@pytest.mark.slow
def test_greedy_output_is_repeatable_and_equals_offline_generate(tiny_server: TinyServer) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)

    def greedy() -> str:
        completion = client.completions.create(
            model="tiny", prompt=TINY_PROMPT, max_tokens=8, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return completion.choices[0].text

    first, second = greedy(), greedy()
    assert first == second
    assert first == tiny_server.tok.decode(tiny_server.greedy_ids, skip_special_tokens=True)


# --- the CLI (slow: subprocesses that import torch) ------------------------------------------


def _serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "runtime", "serve", *args]


def start_cli(log_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m runtime serve --model tiny ...` with a small KV cache on a free loopback port,
    its output in `log_path`, once healthy; killed if it never gets there."""
    port = free_port()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            _serve_cmd("--model", "tiny", "--port", str(port), "--max-model-len", "256",
                       "--num-kv-blocks", "64", *args),
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, log_path.read_text()
        try:
            return get(url + "/health")[0] == 200
        except OSError:  # not listening yet
            return False

    try:
        wait_until(healthy, timeout_s=120)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url


@pytest.mark.slow
def test_cli_serves_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    proc, url = start_cli(log_path, "--drain-timeout-s", "1")
    try:
        reply = post(url + "/v1/completions", {"model": "tiny", "prompt": "The server",
                                               "max_tokens": 4, "ignore_eos": True})  # fmt: skip
        assert reply.status == 200
        assert reply.body["usage"]["completion_tokens"] == 4
        # SIGTERM with a stream in flight: the drain gives it at most a second, then ends it.
        body = {"prompt": "The server", "max_tokens": 250, "ignore_eos": True, "stream": True}
        request = _post_request(url + "/v1/completions", body, None)
        in_flight = urllib.request.urlopen(request, timeout=TIMEOUT_S)
        next(sse_data(in_flight))
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        assert proc.wait(timeout=10) == 0, log_path.read_text()
        assert time.monotonic() - start < 5
        in_flight.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_cli_refuses_a_bad_flag_value_with_exit_code_2() -> None:
    done = subprocess.run(_serve_cmd("--max-num-seqs", "0", "--port", str(free_port())),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert "max_num_seqs" in done.stderr
