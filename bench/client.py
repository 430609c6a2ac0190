"""One streaming request to an OpenAI-compatible server, timed as the bytes arrive.

Timestamps are time.perf_counter() (CLOCK_MONOTONIC on Linux, the same clock a server on the
same host reads with time.monotonic(), which lets calibration join both sides).

Tokens are attributed to the events that carried them, so a server that flushes several
tokens per event does not corrupt ITL: from per-chunk usage deltas when the server sends them
(`continuous_usage_stats`), else from a local tokenizer, else one token per event. Which source
was used is recorded with every request.

Reasoning models stream their thinking before the answer, in chat deltas' `reasoning_content`
(vLLM's older name) or `reasoning` (newer vLLM, OpenRouter). Those tokens are output tokens:
they count for TTFT, ITL and TPOT like any other. Each event is also classed as reasoning or
answer, which gives the time to the first answer token (TTFO) and the reasoning token count.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.config import TargetConfig
from bench.sse import SseParser
from bench.workload import RequestSpec, Tokenizer

# Error kinds recorded in the `error` column (docs/metrics.md lists them).
REFUSED_STATUSES = (429, 503)


@dataclass
class RequestResult:
    request_id: str
    scheduled_s: float  # when the request was meant to go (== sent_s in closed loop)
    sent_s: float
    end_s: float
    ok: bool = False
    error: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    event_s: list[float] = field(default_factory=list)  # arrival of each token-bearing event
    event_tokens: list[int] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    output_tokens_source: str | None = None  # usage | tokenizer | events
    token_attribution: str | None = None  # usage | tokenizer | events
    # The server's own account of the request, where its final usage carries one (the bundled
    # engine's `usage.timings`): queue_ms, prefill_ms, decode_ms, e2e_ms.
    server_timings: dict[str, float] | None = None
    # The first answer (non-reasoning) event, set only when reasoning was streamed: without
    # reasoning the first token is the first answer token, and TTFT already says when it came.
    first_output_s: float | None = None
    reasoning_tokens: int | None = None  # of output_tokens; None when there were none
    # The answer the stream delivered (reasoning excluded): a conversation's next turn sends it
    # back as the assistant's message.
    text: str = ""

    @property
    def first_token_s(self) -> float | None:
        return self.event_s[0] if self.event_s else None

    def itl_s(self) -> list[float]:
        """Per-token gaps: an event carrying k tokens after a gap g contributes k gaps of g/k."""
        gaps: list[float] = []
        for prev, now, k in zip(
            self.event_s, self.event_s[1:], self.event_tokens[1:], strict=False
        ):
            gaps.extend([(now - prev) / k] * k)
        return gaps


def request_body(target: TargetConfig, model: str, spec: RequestSpec) -> dict[str, Any]:
    stream_options: dict[str, bool] = {"include_usage": True}
    if target.continuous_usage_stats:
        stream_options["continuous_usage_stats"] = True
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": spec.output_tokens,
        "stream": True,
        "stream_options": stream_options,
    }
    if target.endpoint == "chat":
        earlier = [
            message
            for turn in spec.history
            for message in (
                {"role": "user", "content": turn.user},
                {"role": "assistant", "content": turn.assistant},
            )
        ]
        body["messages"] = [*earlier, {"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if target.ignore_eos:
        body["ignore_eos"] = True
    body.update(target.extra_body)
    return body


def endpoint_url(target: TargetConfig) -> str:
    path = "/v1/chat/completions" if target.endpoint == "chat" else "/v1/completions"
    return f"{target.base_url}{path}"


# Where chat deltas carry reasoning: vLLM's older name, then newer vLLM's and OpenRouter's.
REASONING_FIELDS = ("reasoning_content", "reasoning")


@dataclass(frozen=True)
class ChunkText:
    """The output text one chunk carried, the answer apart from the reasoning."""

    answer: str
    reasoning: str


def chunk_text(chunk: dict[str, Any]) -> ChunkText:
    choices = chunk.get("choices") or []
    if not choices:
        return ChunkText("", "")
    choice = choices[0]
    if "text" in choice:  # /v1/completions has no reasoning field
        return ChunkText(str(choice.get("text") or ""), "")
    delta = choice.get("delta") or {}
    content = delta.get("content")
    reasoning = (delta.get(k) for k in REASONING_FIELDS)
    return ChunkText(
        content if isinstance(content, str) else "",
        "".join(r for r in reasoning if isinstance(r, str)),
    )


def _error_message(body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        if err is not None:
            return str(err)
    except (ValueError, AttributeError):
        pass
    return body[:500].decode(errors="replace")


class _Stream:
    """Accumulates a response's events; turns them into token attribution at the end."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.texts: list[ChunkText] = []
        self.cum_usage: list[int | None] = []  # completion_tokens so far, per event
        self.final_usage: dict[str, Any] | None = None
        self.last_s: float | None = None

    def add(self, chunk: dict[str, Any], arrived_s: float) -> None:
        self.last_s = arrived_s
        usage = chunk.get("usage")
        if not chunk.get("choices"):
            if isinstance(usage, dict):
                self.final_usage = usage
            return
        text = chunk_text(chunk)
        cum = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if isinstance(usage, dict):
            self.final_usage = usage
        previous = next((c for c in reversed(self.cum_usage) if c is not None), 0)
        if not (text.answer or text.reasoning) and (cum is None or cum <= previous):
            return  # role-only or keep-alive chunk: no token arrived
        self.times.append(arrived_s)
        self.texts.append(text)
        self.cum_usage.append(cum)

    def finish(self, result: RequestResult, tokenizer: Tokenizer | None) -> None:
        usage = self.final_usage or {}
        if isinstance(usage.get("prompt_tokens"), int):
            result.prompt_tokens = usage["prompt_tokens"]
        timings = usage.get("timings")
        if isinstance(timings, dict):
            result.server_timings = {
                k: float(v) for k, v in timings.items() if isinstance(v, int | float)
            }
        counts: list[int]
        if self.cum_usage and all(c is not None for c in self.cum_usage):
            cums = [int(c) for c in self.cum_usage if c is not None]
            counts = [b - a for a, b in zip([0, *cums], cums, strict=False)]
            result.token_attribution = "usage"
        elif tokenizer is not None:
            # Each event's text alone: linear cost on the measuring loop (re-encoding the growing
            # text would be quadratic), exact unless a merge spans two events.
            counts = [
                len(tokenizer.encode(t.reasoning + t.answer, add_special_tokens=False))
                for t in self.texts
            ]
            result.token_attribution = "tokenizer"
        else:
            counts = [1] * len(self.times)
            result.token_attribution = "events"
        # An event whose text only completed a multi-byte character carries no new token.
        kept = [
            (t, k, r)
            for t, k, r in zip(self.times, counts, _reasoning_events(self.texts), strict=True)
            if k > 0
        ]
        result.text = "".join(t.answer for t in self.texts)
        result.event_s = [t for t, _, _ in kept]
        result.event_tokens = [k for _, k, _ in kept]
        if isinstance(usage.get("completion_tokens"), int):
            result.output_tokens, result.output_tokens_source = usage["completion_tokens"], "usage"
        elif tokenizer is not None:
            text = "".join(t.reasoning + t.answer for t in self.texts)
            result.output_tokens = len(tokenizer.encode(text, add_special_tokens=False))
            result.output_tokens_source = "tokenizer"
        else:
            result.output_tokens, result.output_tokens_source = sum(counts), "events"
        streamed = sum(k for _, k, r in kept if r)
        if streamed:
            result.first_output_s = next((t for t, _, r in kept if not r), None)
        details = usage.get("completion_tokens_details")
        reported = details.get("reasoning_tokens") if isinstance(details, dict) else None
        # The server's count where it gives one: it also covers reasoning it never streamed
        # (OpenAI's o-series hide it). A reported 0 beside streamed reasoning is a server that
        # does not count it, so the events' count stands.
        result.reasoning_tokens = (
            reported if isinstance(reported, int) and reported > 0 else streamed or None
        )


def _reasoning_events(texts: list[ChunkText]) -> list[bool]:
    """Which events are reasoning: those whose text is all reasoning. An event carrying both
    (the turn to the answer, where a server flushes several tokens at once) is an answer event,
    so its reasoning tokens are not counted from events. An event without text (a usage-only
    increment, e.g. a reasoning parser's stripped `</think>`) belongs with the event before it,
    or at the start of the stream with the first event that has text."""
    kinds: list[bool | None] = [
        None if not (t.reasoning or t.answer) else not t.answer for t in texts
    ]
    first = next((k for k in kinds if k is not None), False)
    out: list[bool] = []
    for kind in kinds:
        out.append((out[-1] if out else first) if kind is None else kind)
    return out


async def send(
    session: aiohttp.ClientSession,
    target: TargetConfig,
    model: str,
    spec: RequestSpec,
    scheduled_s: float,
    tokenizer: Tokenizer | None = None,
) -> RequestResult:
    """Send one streaming request; never raises for request failures, it records them."""
    request_id = uuid.uuid4().hex
    body = request_body(target, model, spec)
    headers = {"X-Request-Id": request_id}
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    stream, parser = _Stream(), SseParser()
    sent_s = time.perf_counter()
    result = RequestResult(request_id, scheduled_s, sent_s, sent_s)
    try:
        async with session.post(endpoint_url(target), json=body, headers=headers) as resp:
            result.http_status = resp.status
            if resp.status != 200:
                kind = "refused" if resp.status in REFUSED_STATUSES else "http"
                result.error, result.error_message = kind, _error_message(await resp.read())
                return result
            done = False
            async for chunk in resp.content.iter_any():
                arrived_s = time.perf_counter()  # before any parsing: see module docstring
                for event in parser.feed(chunk, arrived_s):
                    if event.data.strip() == "[DONE]":
                        done, stream.last_s = True, event.arrived_s
                        continue
                    payload = json.loads(event.data)
                    if isinstance(payload, dict) and payload.get("error"):
                        result.error = "server_error"
                        result.error_message = _error_message(event.data.encode())
                        return result
                    stream.add(payload, event.arrived_s)
            if not done and parser.pending.strip():
                raise ValueError(f"stream ended inside an event: {parser.pending[:200]!r}")
    except TimeoutError:
        result.error, result.error_message = "timeout", "no complete response within the timeout"
    except aiohttp.ClientConnectorError as exc:
        result.error, result.error_message = "connection", str(exc)
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        result.error, result.error_message = "disconnected", f"{type(exc).__name__}: {exc}"
    except aiohttp.ClientError as exc:
        kind = "disconnected" if result.http_status else "connection"
        result.error, result.error_message = kind, f"{type(exc).__name__}: {exc}"
    except (ValueError, AttributeError, TypeError) as exc:
        result.error, result.error_message = "protocol", f"malformed stream: {exc}"
    finally:
        result.end_s = stream.last_s or time.perf_counter()
    if result.error is None:
        stream.finish(result, tokenizer)
        if result.event_s:
            result.ok = True
        else:
            result.error, result.error_message = "empty", "the stream carried no output token"
    return result


def connector(concurrency: int | None) -> aiohttp.TCPConnector:
    # aiohttp pools 100 connections by default, which would silently cap concurrency.
    return aiohttp.TCPConnector(limit=0 if concurrency is None else max(concurrency, 1))


def session(concurrency: int | None, timeout_s: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=connector(concurrency),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        # The default cap on one line is 8 KiB; a chunk with a long text can exceed it.
        read_bufsize=2**20,
    )
