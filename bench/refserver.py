"""Reference OpenAI-compatible streaming server with an exactly known token schedule.

Run it as ``python -m bench.refserver`` to calibrate the harness, and use it in tests to prove
the harness's timing accuracy: the server knows when every token was due and when it actually
left, so measured TTFT and ITL can be checked against truth rather than against another
measurement.

Schedule. The handler records ``received = time.monotonic()`` when it starts. Output token ``i``
(0-based) is "generated" at ``received + ttft + i * itl``. Tokens leave in events of
``k = --tokens-per-event``: event ``j`` carries tokens ``[j*k, min((j+1)*k, n))`` and is written,
with one ``write`` call, when its last token is generated. Every wait sleeps until an absolute
target time, so one late event never delays the ones after it; asyncio timers still fire up to
about a millisecond late (epoll waits in whole milliseconds), plus scheduling noise, which is why
the truth log records the actual times. Token ``i`` is the text ``f" t{i}"``. The server always
emits exactly ``max_tokens`` tokens (default 16), ignoring EOS, stop strings and sampling
parameters. A non-streaming request waits for the whole schedule and then answers in one piece.

Slots (``--slots K``). At most K requests are generated at once; the others wait, first come
first served, and a request's schedule starts when it gets a slot (``started``), so its TTFT
includes the wait. Closed-loop load above K users therefore queues by a known amount: the
server's capacity is exactly K. ``/metrics`` publishes ``vllm:num_requests_running`` (requests
being generated) and ``vllm:num_requests_waiting`` under vLLM's names, and the final usage carries
the server's own ``timings`` (queue_ms, prefill_ms, decode_ms, e2e_ms) as the bundled engine's
does. Without slots nothing waits. ``--max-concurrency`` instead refuses (429) what it cannot
take.

Reasoning (``--reasoning-tokens N``). The first N tokens of a chat completion are reasoning,
streamed as vLLM streams a reasoning model's: in ``delta.reasoning_content``, the rest in
``delta.content``; an event that spans the turn carries both. The total stays ``max_tokens``,
and the final usage counts them in ``completion_tokens_details.reasoning_tokens``. A
non-streaming answer puts them in ``message.reasoning_content``. /v1/completions has no
reasoning field (a reasoning model's raw text holds its thinking inline), so there the option
changes nothing.

Prompt tokens are the length of a token-id prompt, or the number of whitespace-separated words
of a text prompt (for chat, summed over the message contents).

Truth log (``--log-file``, overwritten at start). One JSON object per line, flushed at once, for
every request accepted (not answered with an error): ``request_id``, ``endpoint``, ``received``,
``started`` (when it got a slot; ``received`` without slots),
``event_writes`` (``time.monotonic()`` immediately before each token-bearing event's write),
``event_tokens`` (tokens in each of those events), ``prompt_tokens``, ``completion_tokens``
(tokens actually written), ``reasoning_tokens`` (how many of those were reasoning, the first
ones) and ``status`` ("ok", or "aborted" when the client went away or the server stopped). A
non-streaming request logs one event holding all its tokens. On Linux ``time.monotonic()`` is
CLOCK_MONOTONIC, the clock behind ``time.perf_counter()`` in every process on the host, so a
client on the same machine can join its own timestamps to these.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest

DEFAULT_MAX_TOKENS = 16
MAX_TOKENS_LIMIT = 1_000_000


@dataclass(frozen=True)
class RefServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port
    model: str = "refserver"
    ttft_ms: float = 50.0
    itl_ms: float = 10.0
    tokens_per_event: int = 1
    max_concurrency: int = 0  # 0 means unlimited
    slots: int = 0  # requests generated at once, the rest queue; 0 means unlimited
    reasoning_tokens: int = 0  # chat: the first this many tokens are streamed as reasoning
    log_file: Path | None = None

    def __post_init__(self) -> None:
        if self.tokens_per_event < 1:
            raise ValueError("tokens_per_event must be at least 1")
        values = (self.ttft_ms, self.itl_ms, self.max_concurrency, self.slots)
        if min(*values, self.reasoning_tokens) < 0:
            raise ValueError(
                "ttft_ms, itl_ms, max_concurrency, slots and reasoning_tokens must not be negative"
            )


@dataclass(frozen=True)
class TruthRecord:
    request_id: str
    endpoint: str
    received: float  # time.monotonic() when the handler started
    started: float  # time.monotonic() when the request got a slot (its schedule's origin)
    event_writes: tuple[float, ...]  # time.monotonic() just before each token event's write
    event_tokens: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int  # the first this many of completion_tokens were reasoning
    status: str  # "ok" | "aborted"

    @property
    def ttft_s(self) -> float:
        if not self.event_writes:
            raise ValueError(f"request {self.request_id} wrote no events")
        return self.event_writes[0] - self.received

    @property
    def ttfo_s(self) -> float | None:
        """To the first event carrying an answer token; None without reasoning (the client
        records no TTFO then) or without an answer after it."""
        if not self.reasoning_tokens:
            return None
        written = 0
        for at, k in zip(self.event_writes, self.event_tokens, strict=True):
            written += k
            if written > self.reasoning_tokens:
                return at - self.received
        return None

    @property
    def itl_s(self) -> list[float]:
        """Per-token gaps, each event's gap shared evenly by the tokens it carried."""
        gaps: list[float] = []
        for j in range(1, len(self.event_writes)):
            share = (self.event_writes[j] - self.event_writes[j - 1]) / self.event_tokens[j]
            gaps.extend([share] * self.event_tokens[j])
        return gaps


def read_truth_log(path: str | Path) -> list[TruthRecord]:
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            raw = json.loads(line)
            raw["event_writes"] = tuple(raw["event_writes"])
            raw["event_tokens"] = tuple(raw["event_tokens"])
            records.append(TruthRecord(**raw))
    return records


class _ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def response(self, headers: dict[str, str]) -> web.Response:
        error = {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}
        return web.json_response({"error": error}, status=self.status, headers=headers)


@dataclass(frozen=True)
class _Params:
    chat: bool
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool


def _count_prompt(prompt: object) -> int:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    count = 0
    if isinstance(prompt, str):
        count = len(prompt.split())
    elif isinstance(prompt, list) and all(type(t) is int and t >= 0 for t in prompt):
        count = len(prompt)
    if count == 0:
        message = "'prompt' must be a non-empty string or token-id list, or a list holding one."
        raise _ApiError(400, message, "prompt")
    return count


def _count_messages(messages: object) -> int:
    if not isinstance(messages, list) or not messages:
        raise _ApiError(400, "'messages' must be a non-empty list.", "messages")
    bad = _ApiError(400, "Each message must be an object with string content.", "messages")
    words = 0
    for message in messages:
        if not isinstance(message, dict):
            raise bad
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts: only text parts carry words
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        if not isinstance(content, str | None):
            raise bad
        words += len((content or "").split())
    return words


def _parse(raw: bytes, chat: bool, model: str) -> _Params:
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise _ApiError(400, f"Request body is not valid JSON: {e}", None) from e
    if not isinstance(body, dict):
        raise _ApiError(400, "Request body must be a JSON object.", None)
    if "model" not in body:
        raise _ApiError(400, "Missing required parameter: 'model'.", "model")
    if body["model"] != model:
        raise _ApiError(
            404, f"The model `{body['model']}` does not exist.", "model", "model_not_found"
        )
    if chat:
        prompt_tokens = _count_messages(body.get("messages"))
    else:
        prompt_tokens = _count_prompt(body.get("prompt"))
    key = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        key = "max_completion_tokens"
    max_tokens = body.get(key)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if type(max_tokens) is not int or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise _ApiError(400, f"'{key}' must be an integer from 1 to {MAX_TOKENS_LIMIT}.", key)
    stream = body.get("stream")
    if not isinstance(stream, bool | None):
        raise _ApiError(400, "'stream' must be a boolean.", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _ApiError(400, "'stream_options' must be an object.", "stream_options")
    return _Params(
        chat,
        prompt_tokens,
        max_tokens,
        bool(stream),
        options.get("include_usage") is True,
        options.get("continuous_usage_stats") is True,
    )


def _usage(prompt: int, completion: int, reasoning: int = 0) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def _timings(received: float, started: float, first: float, last: float) -> dict[str, float]:
    """The server's view of a finished request, as the bundled engine's usage.timings."""

    def ms(a: float, b: float) -> float:
        return round((b - a) * 1e3, 3)

    return {
        "queue_ms": ms(received, started),
        "prefill_ms": ms(started, first),
        "decode_ms": ms(first, last),
        "e2e_ms": ms(received, last),
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def _text(start: int, end: int) -> str:
    return "".join(f" t{i}" for i in range(start, end))


async def _sleep_until(target: float) -> None:
    # Always yields, so a stream that has fallen behind cannot starve the others.
    await asyncio.sleep(max(0.0, target - time.monotonic()))


class _RefServer:
    def __init__(self, cfg: RefServerConfig) -> None:
        self.cfg = cfg
        self.created = int(time.time())
        self.in_flight = 0
        self.running = self.waiting = 0
        self.slots = asyncio.Semaphore(cfg.slots) if cfg.slots else None
        self.log: TextIO | None = None
        self.registry = CollectorRegistry()
        for name, doc, read in (
            ("vllm:num_requests_running", "Requests being generated.", lambda: self.running),
            ("vllm:num_requests_waiting", "Requests waiting for a slot.", lambda: self.waiting),
        ):
            gauge = Gauge(name, doc, ["model_name"], registry=self.registry)
            gauge.labels(cfg.model).set_function(read)

    async def dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        # aiohttp's low-level server, without Application, router and middleware: it starts
        # handlers about twice as fast, and the reference server's own accept queue is part
        # of the error budget it exists to measure (docs/metrics.md).
        route = (request.method, request.path)
        if route == ("POST", "/v1/completions"):
            return await self._handle(request, chat=False)
        if route == ("POST", "/v1/chat/completions"):
            return await self._handle(request, chat=True)
        if route == ("GET", "/health"):
            return web.Response(text="ok")
        if route == ("GET", "/metrics"):
            return web.Response(body=generate_latest(self.registry), content_type="text/plain")
        if route == ("GET", "/v1/models"):
            card = {"id": self.cfg.model, "object": "model", "created": self.created}
            card["owned_by"] = "bench"
            return web.json_response({"object": "list", "data": [card]})
        return web.json_response(
            {"error": {"message": "Not Found", "type": "not_found"}}, status=404
        )

    async def _handle(self, request: web.BaseRequest, chat: bool) -> web.StreamResponse:
        received = time.monotonic()
        headers = {"X-Request-Id": request.headers.get("X-Request-Id") or uuid.uuid4().hex}
        limit = self.cfg.max_concurrency
        if limit and self.in_flight >= limit:
            message = f"Too many requests in flight (limit {limit})."
            error = _ApiError(429, message, None, "rate_limit_exceeded", "rate_limit_error")
            return error.response(headers)
        # Counted before the body is read, so concurrent arrivals cannot all slip under the limit.
        self.in_flight += 1
        try:
            # The payload stream, not request.read(): its 1 MiB cap would refuse long prompts.
            params = _parse(await request.content.read(), chat, self.cfg.model)
            started = received
            if self.slots is not None:
                self.waiting += 1
                try:
                    await self.slots.acquire()  # first come, first served
                finally:
                    self.waiting -= 1
                started = time.monotonic()
            self.running += 1
            try:
                return await self._generate(request, params, received, started, headers)
            finally:
                self.running -= 1
                if self.slots is not None:
                    self.slots.release()
        except _ApiError as e:
            return e.response(headers)
        finally:
            self.in_flight -= 1

    def _head(self, obj: str, cid: str, created: int) -> dict[str, Any]:
        return {"id": cid, "object": obj, "created": created, "model": self.cfg.model}

    def _reasoning(self, p: _Params) -> int:
        """How many of the request's tokens are reasoning: the first ones, chat only."""
        return min(self.cfg.reasoning_tokens, p.max_tokens) if p.chat else 0

    def _chunk(self, p: _Params, cid: str, created: int, start: int, end: int) -> dict[str, Any]:
        finish = "length" if end == p.max_tokens else None
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if p.chat:
            turn = min(max(self._reasoning(p), start), end)
            delta = {"role": "assistant"} if start == 0 else {}
            if turn > start:
                delta["reasoning_content"] = _text(start, turn)
            if end > turn:
                delta["content"] = _text(turn, end)
            choice["delta"] = delta
        else:
            choice["text"] = _text(start, end)
        obj = "chat.completion.chunk" if p.chat else "text_completion"
        body = {**self._head(obj, cid, created), "choices": [choice]}
        if p.continuous_usage:
            body["usage"] = _usage(p.prompt_tokens, end)
        return body

    def _completion(self, p: _Params, cid: str, created: int) -> dict[str, Any]:
        reasoning = self._reasoning(p)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length"}
        if p.chat:
            message = {"role": "assistant", "content": _text(reasoning, p.max_tokens)}
            if reasoning:
                message["reasoning_content"] = _text(0, reasoning)
            choice["message"] = message
        else:
            choice["text"] = _text(0, p.max_tokens)
        body = self._head("chat.completion" if p.chat else "text_completion", cid, created)
        usage = _usage(p.prompt_tokens, p.max_tokens, reasoning)
        return {**body, "choices": [choice], "usage": usage}

    async def _generate(
        self,
        request: web.BaseRequest,
        p: _Params,
        received: float,
        started: float,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        ttft, itl = self.cfg.ttft_ms / 1e3, self.cfg.itl_ms / 1e3
        n, k = p.max_tokens, self.cfg.tokens_per_event
        request_id = headers["X-Request-Id"]
        cid, created = f"{'chatcmpl' if p.chat else 'cmpl'}-{request_id}", int(time.time())
        response: web.StreamResponse
        if p.stream:
            sse_headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            response = web.StreamResponse(headers={**headers, **sse_headers})
        else:
            body = self._completion(p, cid, created)
            last = started + ttft + (n - 1) * itl
            body["usage"]["timings"] = _timings(received, started, started + ttft, last)
            response = web.json_response(body, headers=headers)
        writes: list[float] = []
        tokens: list[int] = []
        status = "aborted"
        try:
            with contextlib.suppress(ConnectionResetError):  # the client went away
                if p.stream:
                    await response.prepare(request)
                    for start in range(0, n, k):
                        end = min(start + k, n)
                        # Serialised before the wait so that the write follows the wake-up.
                        chunk = _sse(self._chunk(p, cid, created, start, end))
                        await _sleep_until(started + ttft + (end - 1) * itl)
                        written = time.monotonic()
                        await response.write(chunk)
                        writes.append(written)
                        tokens.append(end - start)
                    # One write for the tail: every send() costs the shared loop time that
                    # other requests' arrivals wait for.
                    tail = b"data: [DONE]\n\n"
                    if p.include_usage:
                        obj = "chat.completion.chunk" if p.chat else "text_completion"
                        timings = _timings(received, started, writes[0], writes[-1])
                        usage_counts = _usage(p.prompt_tokens, n, self._reasoning(p))
                        final = {**usage_counts, "timings": timings}
                        usage = {"choices": [], "usage": final}
                        tail = _sse({**self._head(obj, cid, created), **usage}) + tail
                    await response.write(tail)
                    await response.write_eof()
                else:
                    await _sleep_until(started + ttft + (n - 1) * itl)
                    written = time.monotonic()
                    await response.prepare(request)
                    await response.write_eof()
                    writes.append(written)
                    tokens.append(n)
                status = "ok"
        finally:  # also on cancellation, so aborted requests reach the log
            self._log(
                TruthRecord(
                    request_id=request_id,
                    endpoint=request.path,
                    received=received,
                    started=started,
                    event_writes=tuple(writes),
                    event_tokens=tuple(tokens),
                    prompt_tokens=p.prompt_tokens,
                    completion_tokens=sum(tokens),
                    reasoning_tokens=min(self._reasoning(p), sum(tokens)),
                    status=status,
                )
            )
        return response

    def _log(self, record: TruthRecord) -> None:
        if self.log is not None:
            # vars(), not asdict(): asdict deep-copies and was a fifth of the handler's time.
            self.log.write(json.dumps(vars(record)) + "\n")
            self.log.flush()


async def _serve(cfg: RefServerConfig) -> None:
    server = _RefServer(cfg)
    # Cancelling handlers on disconnect ends abandoned streams at once instead of at their next
    # write; the short shutdown timeout likewise ends in-flight streams on SIGTERM (logged
    # "aborted") rather than draining synthetic work for up to a minute.
    runner = web.ServerRunner(
        web.Server(server.dispatch, handler_cancellation=True),
        access_log=None,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    with contextlib.ExitStack() as files:
        if cfg.log_file is not None:
            server.log = files.enter_context(open(cfg.log_file, "w", encoding="utf-8"))
        try:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await web.TCPSite(runner, cfg.host, cfg.port).start()
            port = runner.addresses[0][1]
            host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
            print(f"READY http://{host}:{port}", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()  # before the log closes: aborted streams are logged too


def _parse_args(argv: list[str] | None) -> RefServerConfig:
    parser = argparse.ArgumentParser(
        prog="python -m bench.refserver",
        description=(
            "Reference OpenAI-compatible streaming server with an exactly known token schedule, "
            "for calibrating the benchmark harness and testing its timing accuracy. Token i of "
            "every response is due at arrival + ttft + i*itl; with --log-file the server records "
            "when each event was actually written (time.monotonic()), so a client's measured TTFT "
            "and ITL can be compared with the truth. Prints 'READY http://HOST:PORT' once "
            "listening."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one")
    parser.add_argument("--model", default="refserver", help="the only model id served")
    parser.add_argument("--ttft-ms", type=float, default=50.0, help="time to the first token")
    parser.add_argument("--itl-ms", type=float, default=10.0, help="gap between later tokens")
    parser.add_argument(
        "--tokens-per-event", type=int, default=1, help="tokens flushed together in one SSE event"
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=0,
        help="answer 429 while this many requests are in flight; 0 means unlimited",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=0,
        help="generate at most this many requests at once, queueing the rest first come first "
        "served (a server whose capacity is exactly this many users); 0 means unlimited",
    )
    parser.add_argument(
        "--reasoning-tokens",
        type=int,
        default=0,
        help="stream the first this many tokens of every chat completion as reasoning "
        "(delta.reasoning_content, counted in usage.completion_tokens_details), the rest as "
        "content; /v1/completions has no reasoning field and is unchanged",
    )
    parser.add_argument(
        "--log-file", type=Path, help="write a JSONL truth log of every request's event times"
    )
    try:
        return RefServerConfig(**vars(parser.parse_args(argv)))
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> None:
    asyncio.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    main()
