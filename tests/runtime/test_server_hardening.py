"""The server's defences: admission by default, prompt and body limits before the work they
protect, authentication's edges, a published schema that fuzzing holds it to, and a drain on
SIGTERM.

Fast tests serve `FakeCore` (tests/runtime/fake_core.py) with the tiny model's tokenizer, as
tests/runtime/test_server.py does; slow ones serve the real tiny engine, in-process or as
`python -m runtime serve`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import logging
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from runtime import server as server_module
from runtime.__main__ import _parser, api_key, main, max_waiting
from runtime.server import (
    MAX_CHARS_PER_TOKEN,
    ROUTES_GET,
    ROUTES_POST,
    default_max_waiting,
    drain,
    exposure_warning,
    max_body_bytes,
    serve,
)
from tests.runtime.conftest import ServeFake
from tests.runtime.test_server import (
    TIMEOUT_S,
    Reply,
    Served,
    _post_request,
    chunks,
    get,
    get_json,
    metric,
    post,
    sse_data,
    start_cli,
    wait_until,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from runtime.async_engine import EngineCore

OK = {"prompt": [5, 6, 7], "max_tokens": 2}
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


class CountingTokenizer:
    """The tiny tokenizer, counting the calls that tokenise a prompt."""

    def __init__(self, tok: PreTrainedTokenizerBase) -> None:
        self._tok = tok
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._tok.encode(*args, **kwargs)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self._tok.apply_chat_template(*args, **kwargs)


def chars_per_token(tok: PreTrainedTokenizerBase) -> int:
    return max(MAX_CHARS_PER_TOKEN, *map(len, tok.get_vocab()))


def assert_openai_error(reply: Reply, status: int, code: str | None = None) -> dict[str, Any]:
    assert reply.status == status, reply.body
    error: dict[str, Any] = reply.body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if code is not None:
        assert error["code"] == code
    return error


# --- admission by default --------------------------------------------------------------------


def test_the_default_max_waiting_is_256_or_4_batches_whichever_is_more() -> None:
    assert [default_max_waiting(n) for n in (1, 8, 64, 65, 256)] == [256, 256, 256, 260, 1024]


def test_the_cli_bounds_the_queue_by_default_and_0_unbounds_it() -> None:
    parse = _parser().parse_args
    assert max_waiting(parse(["serve"])) == 1024  # --max-num-seqs 256
    assert max_waiting(parse(["serve", "--max-num-seqs", "100"])) == 400
    assert max_waiting(parse(["serve", "--max-num-seqs", "100", "--max-waiting", "0"])) == 0
    assert max_waiting(parse(["serve", "--max-waiting", "7"])) == 7


def test_help_states_the_serving_defaults_and_policies(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: max(256, 4 x --max-num-seqs); 0: unbounded" in text
    assert "$VLLM_API_KEY" in text
    assert "/health, /metrics and /openapi.json stay open" in text
    assert "--drain-timeout-s" in text and "(default: 30.0)" in text


@pytest.mark.parametrize("flags", [["--max-waiting", "-1"], ["--drain-timeout-s", "-1"]])
def test_negative_limits_are_refused_with_exit_code_2(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *flags]) == 2
    assert flags[0] in capsys.readouterr().err


def test_a_refusal_past_max_waiting_says_when_to_retry_and_is_counted(
    serve_fake: ServeFake,
) -> None:
    served, _ = serve_fake(max_waiting=1, max_num_seqs=1, step_s=0.01, max_model_len=1024)
    url = served.url + COMPLETIONS
    assert metric(served.url, "runtime:requests_rejected_total", reason="queue_full") == 0
    long = {"prompt": [5, 6, 7], "max_tokens": 1000, "stream": True}
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        urllib.request.urlopen(_post_request(url, long, None), timeout=TIMEOUT_S) as running,
    ):
        next(sse_data(running))  # it holds the only batch slot
        waiting = pool.submit(post, url, {"prompt": [8, 9], "max_tokens": 3})
        wait_until(lambda: metric(served.url, "vllm:num_requests_waiting") == 1)
        refused = post(url, {"prompt": [8, 9], "max_tokens": 3})
        refused_stream = post(url, {"prompt": [8, 9], "max_tokens": 3, "stream": True})
    assert waiting.result(TIMEOUT_S).status == 200
    for reply in (refused, refused_stream):
        error = assert_openai_error(reply, 429, "rate_limit_exceeded")
        assert error["type"] == "rate_limit_error"
        assert reply.headers["Retry-After"] == "1"
    assert metric(served.url, "runtime:requests_rejected_total", reason="queue_full") == 2
    assert metric(served.url, "runtime:requests_rejected_total", reason="draining") == 0


# --- prompt length and body size -------------------------------------------------------------


def test_a_text_prompt_that_cannot_fit_is_400_without_being_tokenised(
    serve_fake: ServeFake, tok: PreTrainedTokenizerBase
) -> None:
    counting = CountingTokenizer(tok)
    served, core = serve_fake(tokenizer=counting, max_model_len=64)
    limit = 64 * chars_per_token(tok)
    for prompt in ("a" * (limit + 1), ["b" * (limit + 1)]):
        reply = post(served.url + COMPLETIONS, {"prompt": prompt, "max_tokens": 1})
        error = assert_openai_error(reply, 400, "context_length_exceeded")
        assert error["param"] == "prompt"
        assert str(limit) in error["message"]
    half = "c" * (limit // 2 + 1)  # each message fits; together they do not
    messages = [{"role": "user", "content": half}, {"role": "user", "content": half}]
    reply = post(served.url + CHAT, {"messages": messages})
    assert assert_openai_error(reply, 400, "context_length_exceeded")["param"] == "messages"
    assert counting.calls == 0
    assert not core.seqs
    # At the bound the prompt is tokenised, and refused for its token count.
    reply = post(served.url + COMPLETIONS, {"prompt": "a " * (limit // 2), "max_tokens": 1})
    assert_openai_error(reply, 400, "context_length_exceeded")
    assert counting.calls == 1


def test_a_token_id_prompt_longer_than_max_model_len_is_400_context_length_exceeded(
    serve_fake: ServeFake,
) -> None:
    served, core = serve_fake(max_model_len=64)
    for prompt in ([5] * 65, [[5] * 64]):  # past it; exactly it, which leaves no room
        reply = post(served.url + COMPLETIONS, {"prompt": prompt, "max_tokens": 1})
        assert assert_openai_error(reply, 400, "context_length_exceeded")["param"] == "prompt"
    reply = post(served.url + COMPLETIONS, {"prompt": [5] * 60, "max_tokens": 5})
    assert assert_openai_error(reply, 400, "context_length_exceeded")["param"] == "max_tokens"
    assert not core.seqs


def test_the_body_cap_holds_the_longest_prompt_as_ids_or_text_and_is_at_least_1_mib() -> None:
    assert max_body_bytes(256) == 1024 * 1024
    for max_model_len in (32_768, 131_072, 1_048_576):
        cap = max_body_bytes(max_model_len)
        ids = json.dumps({"prompt": [999_999] * max_model_len, "max_tokens": 1})
        text = json.dumps({"prompt": "x" * (max_model_len * MAX_CHARS_PER_TOKEN)})
        assert len(ids) < cap and len(text) < cap
        assert cap < 2 * len(text)  # and not much more
    assert max_body_bytes(131_072, chars_per_token=64) > max_body_bytes(131_072)


def _padded(size: int) -> bytes:
    """A valid request body of `size` bytes: JSON allows any whitespace after the value."""
    body = json.dumps(OK).encode()
    return body + b" " * (size - len(body))


def _post_chunked(url: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """POST without a Content-Length: the server learns the size only by reading."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    try:
        pieces = (body[i : i + 65536] for i in range(0, len(body), 65536))
        connection.request("POST", path, body=pieces, encode_chunked=True,
                           headers={"Content-Type": "application/json"})  # fmt: skip
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_body_over_the_cap_is_413_with_an_openai_error_before_anything_runs(
    serve_fake: ServeFake,
) -> None:
    served, core = serve_fake(max_model_len=256)
    cap = max_body_bytes(256)
    assert post(served.url + COMPLETIONS, _padded(cap)).status == 200
    for path in (COMPLETIONS, CHAT):
        reply = post(served.url + path, _padded(cap + 1))
        assert assert_openai_error(reply, 413, "request_too_large")["param"] == "body"
        status, body = _post_chunked(served.url, path, _padded(cap + 1))
        assert status == 413 and body["error"]["code"] == "request_too_large"
    assert len(core.aborted) == 0 and not core.seqs


def test_a_longer_context_takes_a_larger_body(serve_fake: ServeFake) -> None:
    served, _ = serve_fake(max_model_len=65_536)
    reply = post(served.url + COMPLETIONS, _padded(2 * 1024 * 1024))
    assert reply.status == 200 and reply.body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        pytest.param(COMPLETIONS, b"[" * 100_000, "body", id="nested-too-deeply"),
        pytest.param(COMPLETIONS, b'{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt",
                     id="completion-lone-surrogate"),
        pytest.param(CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages",
                     id="chat-lone-surrogate"),
    ],
)  # fmt: skip
def test_bodies_that_break_a_parser_or_tokenizer_are_400_not_500(
    serve_fake: ServeFake, path: str, body: bytes, param: str
) -> None:
    served, _ = serve_fake()
    assert assert_openai_error(post(served.url + path, body), 400)["param"] == param
    assert get(served.url + "/health")[0] == 200


# --- authentication --------------------------------------------------------------------------


def test_the_api_key_comes_from_vllm_api_key_unless_the_flag_gives_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parse = _parser().parse_args
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert api_key(parse(["serve"])) is None
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert api_key(parse(["serve"])) == "from-env"
    assert api_key(parse(["serve", "--api-key", "from-flag"])) == "from-flag"
    monkeypatch.setenv("VLLM_API_KEY", "")
    assert api_key(parse(["serve"])) is None


def test_with_a_key_health_metrics_and_openapi_stay_open_and_v1_is_guarded(
    serve_fake: ServeFake,
) -> None:
    served, _ = serve_fake(api_key="sekrit")
    assert get(served.url + "/health") == (200, "ok")
    assert get(served.url + "/metrics")[0] == 200
    assert get(served.url + "/openapi.json")[0] == 200
    assert_openai_error(get_json(served.url + "/v1/models"), 401, "invalid_api_key")
    assert_openai_error(post(served.url + COMPLETIONS, OK), 401, "invalid_api_key")
    key = {"Authorization": "Bearer sekrit"}
    assert get_json(served.url + "/v1/models", key).status == 200
    assert post(served.url + COMPLETIONS, OK, key).status == 200
    document = get_json(served.url + "/openapi.json").body
    assert document["paths"][COMPLETIONS]["post"]["security"] == [{"bearer": []}]
    assert "security" not in document["paths"]["/health"]["get"]


@pytest.mark.parametrize(
    ("host", "key", "warned"),
    [
        ("127.0.0.1", None, False),
        ("127.0.0.2", None, False),
        ("localhost", None, False),
        ("::1", None, False),
        ("[::1]", None, False),
        ("0.0.0.0", None, True),
        ("::", None, True),
        ("", None, True),
        ("192.168.1.20", None, True),
        ("gpu-box.internal", None, True),
        ("0.0.0.0", "sekrit", False),
    ],
)
def test_exposure_warning_is_for_a_non_loopback_address_without_a_key(
    host: str, key: str | None, warned: bool
) -> None:
    warning = exposure_warning(host, key)
    assert (warning is not None) == warned
    if warning is not None:
        assert (host or "every interface") in warning and "--api-key" in warning


@pytest.mark.parametrize(("host", "warned"), [("0.0.0.0", True), ("127.0.0.1", False)])
def test_serve_logs_the_warning_before_it_listens(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, host: str, warned: bool
) -> None:
    async def refuse(app: Any, host: str, port: int) -> Any:
        raise OSError("no socket in this test")

    def never_loaded() -> tuple[EngineCore, PreTrainedTokenizerBase]:
        raise AssertionError("the model is loaded only once the socket is up")

    monkeypatch.setattr(server_module, "start_server", refuse)
    caplog.set_level(logging.WARNING, logger="runtime.server")
    with pytest.raises(OSError, match="no socket in this test"):
        asyncio.run(serve(never_loaded, "m", host=host, port=0))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warnings) == warned
    if warned:
        assert "listening on 0.0.0.0 without an API key" in warnings[0]


# --- the published schema --------------------------------------------------------------------


def test_openapi_json_describes_every_route_and_the_error_body(serve_fake: ServeFake) -> None:
    served, _ = serve_fake()
    reply = get_json(served.url + "/openapi.json")
    assert reply.status == 200
    document = reply.body
    assert document["openapi"].startswith("3.")
    app = served._runner.app
    assert app is not None
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(m, path) for path, item in document["paths"].items() for m in item}
    assert documented == routes
    assert routes == {("post", p) for p in ROUTES_POST} | {("get", p) for p in ROUTES_GET}
    schemas = document["components"]["schemas"]
    assert schemas["Error"]["properties"]["error"]["required"] == ["message", "type"]
    for path in ROUTES_POST:
        operation = document["paths"][path]["post"]
        assert operation["requestBody"]["required"] is True
        assert {"200", "400", "401", "413", "429", "503"} <= set(operation["responses"])
    assert {"prompt", "max_tokens", "stream"} <= set(schemas["CompletionRequest"]["properties"])
    assert {"messages", "max_completion_tokens"} <= set(
        schemas["ChatCompletionRequest"]["properties"]
    )


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/nope", 404), ("GET", COMPLETIONS, 405), ("POST", "/health", 405)],
)
def test_unknown_routes_and_methods_get_openai_errors(
    serve_fake: ServeFake, method: str, path: str, status: int
) -> None:
    served, _ = serve_fake()
    data = b"{}" if method == "POST" else None
    request = urllib.request.Request(served.url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            raise AssertionError(f"{method} {path} answered {response.status}")
    except urllib.error.HTTPError as error:
        reply = Reply(error.code, json.loads(error.read()), dict(error.headers))
    assert_openai_error(reply, status)
    if status == 405:
        assert method not in reply.headers["Allow"]


FUZZ_EXAMPLES = 100  # per route and mode: valid bodies, then bodies that break the schema


@pytest.mark.slow
def test_fuzzing_every_route_from_the_schema_finds_no_5xx_and_no_hang(
    serve_fake: ServeFake,
) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    served, core = serve_fake(max_model_len=128, step_s=0.0)
    document = get_json(served.url + "/openapi.json").body
    schema = schemathesis.openapi.from_dict(document)

    def fuzz(operation: Any, mode: GenerationMode) -> set[int]:
        """Send the operation's generated requests; the statuses they got."""
        statuses: set[int] = set()

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:
            response = case.call(base_url=served.url, timeout=TIMEOUT_S)  # a hang fails here
            statuses.add(response.status_code)
            assert response.status_code < 500, (case.body, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert isinstance(error["message"], str), response.text
                assert isinstance(error["type"], str), response.text

        check()
        return statuses

    both = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    seen = {
        # A route without parameters or body has nothing to make invalid.
        (f"{method.upper()} {path}", mode): fuzz(schema[path][method.upper()], mode)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        for mode in (both if "requestBody" in operation else both[:1])
    }
    assert get(served.url + "/health")[0] == 200
    # Valid bodies reached the engine, not only the validation in front of it; invalid ones
    # were refused.
    for path in ROUTES_POST:
        assert 200 in seen[f"POST {path}", GenerationMode.POSITIVE]
        assert 400 in seen[f"POST {path}", GenerationMode.NEGATIVE]
    wait_until(lambda: not core.scheduler.has_work)


# --- drain -----------------------------------------------------------------------------------


def start_drain(
    served: Served, timeout_s: float, hurry: asyncio.Event | None = None
) -> concurrent.futures.Future[None]:
    app = served._runner.app
    assert app is not None
    return asyncio.run_coroutine_threadsafe(drain(app, timeout_s, hurry), served._loop)


def test_a_drain_lets_requests_in_flight_finish_and_refuses_new_ones(serve_fake: ServeFake) -> None:
    served, _ = serve_fake(step_s=0.005, max_model_len=1024)
    url = served.url + COMPLETIONS
    body = {"prompt": [5, 6, 7], "max_tokens": 200, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with urllib.request.urlopen(_post_request(url, body, None), timeout=TIMEOUT_S) as response:
        events = sse_data(response)
        next(events)
        drained = start_drain(served, TIMEOUT_S)
        wait_until(lambda: get(served.url + "/health")[0] == 503)
        for path in (COMPLETIONS, CHAT):
            refused = post(served.url + path, OK)
            assert_openai_error(refused, 503, "server_shutting_down")
        assert not drained.done()  # it waits for the stream
        rest = list(events)
    drained.result(TIMEOUT_S)
    *_, usage = chunks(rest)
    assert usage["usage"]["completion_tokens"] == 200
    assert not any("error" in json.loads(e) for e in rest[:-1])
    assert metric(served.url, "runtime:requests_rejected_total", reason="draining") == 2


def test_a_drain_ends_what_is_still_running_at_its_deadline(serve_fake: ServeFake) -> None:
    served, _ = serve_fake(step_s=0.01, max_model_len=2048, num_kv_blocks=2048)
    url = served.url + COMPLETIONS
    body = {"prompt": [5, 6, 7], "max_tokens": 2000}
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        urllib.request.urlopen(
            _post_request(url, {**body, "stream": True}, None), timeout=TIMEOUT_S
        ) as response,
    ):
        events = sse_data(response)
        next(events)
        whole = pool.submit(post, url, body)
        wait_until(lambda: metric(served.url, "vllm:num_requests_running") == 2)
        start = time.monotonic()
        drained = start_drain(served, 0.3)
        rest = list(events)
        drained.result(TIMEOUT_S)
        assert time.monotonic() - start < 3  # 20 s of decoding were left
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["type"] == "service_unavailable"
    assert "shut down before this request finished" in error["message"]
    assert_openai_error(whole.result(TIMEOUT_S), 503)


def test_hurry_cuts_a_drain_short(serve_fake: ServeFake) -> None:
    served, _ = serve_fake(step_s=0.01, max_model_len=2048, num_kv_blocks=1024)
    body = {"prompt": [5, 6, 7], "max_tokens": 2000, "stream": True}
    hurry = asyncio.Event()
    request = _post_request(served.url + COMPLETIONS, body, None)
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        events = sse_data(response)
        next(events)
        drained = start_drain(served, 60, hurry)
        time.sleep(0.2)
        assert not drained.done()
        served._loop.call_soon_threadsafe(hurry.set)
        drained.result(TIMEOUT_S)
        assert json.loads(list(events)[-2])["error"]["type"] == "service_unavailable"


# --- the real tiny engine (slow) -------------------------------------------------------------


@pytest.mark.slow
def test_a_subnormal_temperature_samples_greedily_instead_of_killing_the_engine() -> None:
    from runtime.__main__ import load
    from runtime.config import EngineConfig

    cfg = EngineConfig(model="tiny", max_model_len=256, num_kv_blocks=64, max_num_seqs=4)
    engine, tok = load(cfg, None)
    served = Served(lambda: (engine, tok), name="tiny")
    try:
        served.wait_healthy(60)
        url = served.url + COMPLETIONS
        body = {"prompt": "The server", "max_tokens": 8, "ignore_eos": True}
        greedy = post(url, {**body, "temperature": 0})
        tiny = post(url, {**body, "temperature": 5e-324})
        assert tiny.status == 200, tiny.body
        assert tiny.body["choices"][0]["text"] == greedy.body["choices"][0]["text"]
        assert get(served.url + "/health")[0] == 200
    finally:
        served.close()


DRAINED_TOKENS = 240  # within --max-model-len 256


@pytest.mark.slow
def test_sigterm_drains_a_stream_in_flight_refuses_new_requests_then_exits_0(
    tmp_path: Path,
) -> None:
    log_path = tmp_path / "serve.log"
    # The stream takes a few hundred milliseconds on an idle machine and much longer on a busy
    # one: the drain's timeout leaves it all the time it needs.
    proc, url = start_cli(log_path, "--drain-timeout-s", "120")
    try:
        options = {"include_usage": True, "continuous_usage_stats": True}
        body = {"prompt": "The server", "max_tokens": DRAINED_TOKENS, "ignore_eos": True,
                "stream": True, "stream_options": options}  # fmt: skip
        request = _post_request(url + COMPLETIONS, body, None)
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            events = sse_data(response)
            next(events)
            proc.send_signal(signal.SIGTERM)
            wait_until(lambda: get(url + "/health")[0] == 503)
            assert_openai_error(post(url + COMPLETIONS, OK), 503, "server_shutting_down")
            rest = list(events)
        *_, usage = chunks(rest)
        assert usage["usage"]["completion_tokens"] == DRAINED_TOKENS
        assert not any("error" in json.loads(e) for e in rest[:-1])
        assert proc.wait(timeout=TIMEOUT_S) == 0, log_path.read_text()  # once it has finished
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert "draining 1 requests in flight" in log  # the stream was still running at SIGTERM
    assert "without an API key" not in log  # loopback: no warning
