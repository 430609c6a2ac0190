"""The bundled engine's OpenAI-compatible HTTP server (aiohttp) over `AsyncEngine`.

Endpoints: POST /v1/completions and /v1/chat/completions (streaming or not); GET /v1/models
(its card also carries `max_model_len`, `vocab_size`, the engine's `load_breakdown` and its
`kernels`); GET /health (200 once the model is loaded and the engine healthy, else 503);
GET /metrics (Prometheus text, vLLM's metric names, labelled `model_name`); GET /openapi.json
(the OpenAPI 3 document of all of these).

Server-side timings, where the harness finds them: the final `usage` object of a response
carries an extra field `timings` = {"queue_ms", "prefill_ms", "decode_ms", "e2e_ms"} (the
non-streaming response's usage; when streaming, the `include_usage` chunk and, with
`continuous_usage_stats`, also the chunk that carries `finish_reason`). All are
time.perf_counter() differences (see `RequestTimings`):

- queue_ms: HTTP arrival -> first scheduled (includes parsing and tokenisation),
- prefill_ms: first scheduled -> first token,
- decode_ms: first token -> last token used,
- e2e_ms: HTTP arrival -> last token used (the response's own writing is not included).

Text. Output tokens are detokenised incrementally (tokenizers' `DecodeStream`, seeded with the
prompt's last tokens), never emitting half a multi-byte character. Stop strings are
matched on that text; the output is cut before the stop string, `finish_reason` is "stop" and
the request is aborted in the engine. While streaming, the last (longest stop string - 1)
characters are held back, so no prefix of a stop string is ever sent and then retracted.

A streamed response's headers go out with its first token: errors found before it (queue full,
a prompt the engine refuses) are proper HTTP statuses; an engine failure after it is an SSE
`{"error": ...}` event. The model loads in a daemon thread after the socket is up: /health
answers 503 meanwhile, and the harness measures load time as spawn -> first 200.

Errors. Every 4xx and 5xx that this server answers, unknown routes and methods included, has
OpenAI's body {"error": {"message", "type", "param", "code"}}; GET /openapi.json describes
every route, its request body and its errors (runtime/openapi.py).

Limits, each checked before the work it protects:

- Admission: at most `max_waiting` requests wait for a batch slot beyond those running; more
  get 429 (`rate_limit_exceeded`) with `Retry-After: 1`. The CLI's default is
  max(256, 4 x --max-num-seqs) (`default_max_waiting`); 0 means unbounded.
- Body size: a request body may hold the longest prompt the model takes and little more:
  max(1 MiB, max_model_len x (8 + MAX_CHARS_PER_TOKEN) bytes + 64 KiB) (`max_body_bytes`: a
  token id is at most 8 bytes of JSON); a larger one gets 413 (`request_too_large`) before it
  is read.
- Prompt length: a text prompt (a completion's `prompt`, or chat messages' roles and contents
  together) longer than max_model_len x MAX_CHARS_PER_TOKEN characters (32, or the
  tokenizer's longest token if longer: no token covers more characters) cannot fit, and gets
  400 (`context_length_exceeded`) without being tokenised; so does a prompt of token ids, or
  one tokenised, that leaves no room for output.

/metrics adds to vLLM's names one counter of this server's own:
`runtime:requests_rejected_total{model_name, reason}`, requests refused for the server's state
rather than their content: reason="queue_full" (429, past max_waiting) or "draining" (503,
arrived after SIGTERM).

Authentication: with an API key (`--api-key`, else the VLLM_API_KEY environment variable, as
vLLM), every /v1/* route requires `Authorization: Bearer <key>` (401 otherwise, compared in
constant time); /health, /metrics and /openapi.json stay open, as vLLM's do, for probes and
scrapers. Listening on anything but a loopback address without a key logs a warning
(`exposure_warning`).

Shutdown. On SIGTERM or SIGINT the server drains (`drain`): new requests get 503 and /health
turns 503 while the socket stays open, requests in flight run to their end for up to
`drain_timeout_s`, and those still running then are ended (a stream with an SSE error event,
a non-streamed request with 503); then it exits. A second signal ends the drain at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import signal
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import jinja2
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from tokenizers.decoders import DecodeStream

from runtime.async_engine import AsyncEngine, EngineCore, EngineDeadError, QueueFull, RequestTimings
from runtime.openapi import openapi_document
from runtime.sequence import EngineStats, SamplingParams, TokenOutput

if TYPE_CHECKING:  # transformers takes seconds to import; the socket must be up before that
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
T = TypeVar("T")

EngineFactory = Callable[[], "tuple[EngineCore, PreTrainedTokenizerBase]"]

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# An upper bound on the characters one token stands for, so that a text prompt that cannot fit
# is refused without tokenising it (raised to the tokenizer's longest token, see _longest_token).
MAX_CHARS_PER_TOKEN = 32
TOKEN_ID_JSON_BYTES = 8  # "262143, ": an id under 1M as json.dumps writes it in a list
MIN_BODY_BYTES = 1024 * 1024  # aiohttp's own default cap
BODY_MARGIN_BYTES = 64 * 1024  # the other fields: sampling parameters, stop strings, roles
# The CLI's default --max-waiting: enough to absorb a burst of several batches, few enough
# that an overloaded server answers 429 at once rather than after minutes in a queue.
MAX_WAITING_FLOOR, MAX_WAITING_PER_SEQ = 256, 4
RETRY_AFTER_S = 1  # a slot frees within about one request's decode
REJECT_REASONS = ("queue_full", "draining")  # runtime:requests_rejected_total's reason label
# Prompt tokens decoded ahead of the output, so that tokenizers which drop a leading space at
# the start of a decode (SentencePiece) still produce the output's first space (vLLM uses 5).
DETOKENIZE_CONTEXT = 5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what a torch.Generator accepts
# Fields that change the output in ways this server does not implement, with the values that
# mean "off": refused rather than silently ignored.
UNSUPPORTED = {
    "echo": (False,),
    "suffix": ("",),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "best_of": (1,),
    "logit_bias": ({},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "repetition_penalty": (1,),
    "min_tokens": (0,),
    "tools": ([],),
    "response_format": ({"type": "text"},),
}
# vLLM's histogram buckets, so that dashboards built for vLLM read these unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


class ModelLoadError(RuntimeError):
    """The engine factory failed; the server cannot become healthy."""


class EngineFailedError(RuntimeError):
    """The engine failed while serving (a tensor-parallel rank died, say): it can never step
    again, so the server exits rather than answer 500 until someone restarts it."""


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error = {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self, headers: dict[str, str]) -> web.Response:
        headers = {**headers, **self.headers}
        return web.json_response(self.body(), status=self.status, headers=headers)


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param)


def _too_long(param: str, message: str) -> ApiError:
    return ApiError(400, message, param, "context_length_exceeded")


def _shutting_down() -> ApiError:
    message = "The server is shutting down and takes no new requests; send it elsewhere."
    return ApiError(503, message, code="server_shutting_down", kind="service_unavailable")


def default_max_waiting(max_num_seqs: int) -> int:
    """The CLI's --max-waiting when none is given: max(256, 4 x max_num_seqs)."""
    return max(MAX_WAITING_FLOOR, MAX_WAITING_PER_SEQ * max_num_seqs)


def max_body_bytes(max_model_len: int, chars_per_token: int = MAX_CHARS_PER_TOKEN) -> int:
    """The largest request body taken: room for the longest prompt, as token ids or as text."""
    per_token = TOKEN_ID_JSON_BYTES + chars_per_token
    return max(MIN_BODY_BYTES, max_model_len * per_token + BODY_MARGIN_BYTES)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to warn of when listening on `host` with `api_key`, or None: without a key, any
    address but a loopback one lets whoever reaches it use the model."""
    if api_key or _is_loopback(host):
        return None
    where = host or "every interface"
    return (
        f"listening on {where} without an API key: anyone who can reach this address can use "
        "the model. Pass --api-key (or set VLLM_API_KEY), or bind 127.0.0.1."
    )


# --- request parsing -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """A validated request, ready for the engine."""

    chat: bool
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    continuous_usage: bool


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise _bad("body", f"The request body is not valid JSON: {exc}.") from exc
    except RecursionError as exc:  # json's decoder recurses once per level of nesting
        raise _bad("body", "The request body is nested too deeply.") from exc
    if not isinstance(body, dict):
        raise _bad("body", f"The request body must be a JSON object, got {type(body).__name__}.")
    return body


def _int(body: dict[str, Any], name: str, default: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is not int:  # bool is an int subclass, and not a valid count
        raise _bad(name, f"'{name}' must be an integer, got {value!r}.")
    return value


def _float(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _bad(name, f"'{name}' must be a finite number, got {value!r}.")
    return float(value)


def _bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(name, f"'{name}' must be a boolean, got {value!r}.")
    return value


def _token_ids(value: object) -> bool:
    return isinstance(value, list) and all(type(t) is int and t >= 0 for t in value)


def _stop_strings(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("stop", f"'stop' must be a non-empty string or a list of them, got {stop!r}.")
    return tuple(stops)


def _sampling_params(
    body: dict[str, Any], chat: bool, prompt_len: int, max_model_len: int
) -> SamplingParams:
    room = max_model_len - prompt_len
    where = "messages" if chat else "prompt"
    if room < 1:
        raise _too_long(
            where,
            f"The prompt is {prompt_len} tokens long and this model's maximum context length "
            f"is {max_model_len} tokens, which leaves no room for output. Shorten the prompt.",
        )
    key = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        key = "max_completion_tokens"
    # Chat has no default length in OpenAI's API: the rest of the context, as vLLM does.
    max_tokens = _int(body, key, room if chat else DEFAULT_MAX_TOKENS)
    assert max_tokens is not None
    if max_tokens < 1:
        raise _bad(key, f"'{key}' must be at least 1, got {max_tokens}.")
    if max_tokens > room:
        raise _too_long(
            key,
            f"This model's maximum context length is {max_model_len} tokens, but the prompt is "
            f"{prompt_len} tokens and '{key}' asks for {max_tokens} more "
            f"({prompt_len + max_tokens} in all). Lower '{key}' to at most {room} or shorten "
            "the prompt.",
        )
    temperature = _float(body, "temperature", 1.0)
    if temperature < 0:
        raise _bad("temperature", f"'temperature' must be >= 0, got {temperature}.")
    top_p = _float(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise _bad("top_p", f"'top_p' must be in (0, 1], got {top_p}.")
    top_k = _int(body, "top_k", 0)
    assert top_k is not None
    if top_k < -1:
        raise _bad("top_k", f"'top_k' must be -1 or 0 (off) or a positive integer, got {top_k}.")
    seed = _int(body, "seed")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise _bad("seed", f"'seed' must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {seed}.")
    stop_token_ids = body.get("stop_token_ids")
    if stop_token_ids is not None and not _token_ids(stop_token_ids):
        raise _bad("stop_token_ids", "'stop_token_ids' must be a list of token ids (ints >= 0).")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),
        seed=seed,
        ignore_eos=_bool(body, "ignore_eos"),
        stop_token_ids=tuple(stop_token_ids or ()),
        stop=_stop_strings(body),
    )


def _check_supported(body: dict[str, Any]) -> None:
    n = _int(body, "n", 1)
    if n != 1:
        raise _bad("n", f"Only n=1 is supported, got n={n}; send {n} requests instead.")
    for name, off in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in off:
            raise _bad(name, f"'{name}' is not supported by this server; remove it or set it "
                             f"to {off[0]!r}.")  # fmt: skip


def _chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content} objects.")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str):
            raise _bad("messages", f"messages[{i}] must be an object with a string 'role'.")
        content = message.get("content")
        if isinstance(content, list):  # OpenAI content parts; only text is understood here
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise _bad(
                    "messages",
                    f"messages[{i}].content: only parts of the form "
                    '{"type": "text", "text": "..."} are supported.',
                )
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str | None):
            raise _bad("messages", f"messages[{i}].content must be a string or a list of parts.")
        out.append({"role": role, "content": content or ""})
    return out


def _completion_prompt(prompt: object) -> str | list[int]:
    """The one prompt of a completion request: text, or token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if _token_ids(prompt) and prompt:
        assert isinstance(prompt, list)
        return list(prompt)
    raise _bad(
        "prompt",
        "'prompt' must be a non-empty string or list of token ids, or a list holding one of "
        "them (one prompt per request).",
    )


def _check_unicode(text: str, param: str) -> None:
    """Refuse text the tokenizer cannot take: JSON can spell a lone surrogate ("\\ud800"),
    which has no UTF-8 form."""
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise _bad(param, f"The text is not valid Unicode: {exc}.") from exc


def _longest_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Characters in the tokenizer's longest vocabulary entry: no token covers more characters
    of text (a byte-level entry has one character per byte, at least one per character)."""
    return max(map(len, tokenizer.get_vocab()), default=0)


# --- output text -----------------------------------------------------------------------------


class _OutputText:
    """A request's output text: incremental detokenisation and stop strings (module docstring).

    Detokenisation is the tokenizers library's `DecodeStream`, one Rust call per token (about
    9x cheaper than re-decoding a window through transformers, and this runs on the event loop
    for every token of every stream). It starts from the prompt's last tokens so that a
    SentencePiece tokenizer's leading space comes out right, and returns nothing until a
    multi-byte character is complete. `_sent <= len(text)` is how much the client has.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], stop: tuple[str, ...]
    ) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(ids=prompt_ids[-DETOKENIZE_CONTEXT:], skip_special_tokens=True)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._sent = 0
        self.text = ""
        self.stopped = False  # a stop string was found; `text` ends before it

    def add(self, token_ids: list[int]) -> None:
        new = "".join(filter(None, (self._stream.step(self._backend, t) for t in token_ids)))
        if not new:
            return  # nothing printable yet: a special token, or a character still incomplete
        # A stop string may begin in the last `_hold` characters already held.
        start = max(len(self.text) - self._hold, 0)
        self.text += new
        found = [i for s in self._stop if (i := self.text.find(s, start)) >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True

    def take(self, final: bool) -> str:
        """The text not yet sent that is safe to send now."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._hold
        delta = self.text[self._sent : max(end, self._sent)]
        self._sent += len(delta)
        return delta


# --- metrics ---------------------------------------------------------------------------------


class _EngineCollector(Collector):
    """Gauges (and the preemption counter) read from the engine at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None]) -> None:
        self._model_name, self._stats = model_name, stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        if stats is None:  # still loading: no engine to describe
            return
        labels = ["model_name"]
        gauges = [
            ("vllm:num_requests_running", "Requests in the running batch.", stats.num_running),
            ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
            ("vllm:kv_cache_usage_perc", "KV cache usage; 1 means 100 percent.",
             stats.kv_cache_usage),
        ]  # fmt: skip
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric([self._model_name], value)
            yield gauge
        preemptions = CounterMetricFamily(
            "vllm:num_preemptions", "Cumulative preemptions by the engine.", labels=labels
        )
        preemptions.add_metric([self._model_name], stats.num_preemptions)
        yield preemptions
        # vLLM's name and labels: the KV cache's size, as an info metric (value 1).
        cache = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the KV cache's configuration.",
            labels=["num_gpu_blocks", "block_size"],
        )  # fmt: skip
        cache.add_metric([str(stats.num_kv_blocks), str(stats.block_size)], 1.0)
        yield cache


class _Metrics:
    """vLLM's request metrics in a registry of their own (tests run several servers at once)."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None]) -> None:
        self.registry = r = CollectorRegistry()
        m = model_name
        labels = ["model_name"]
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefill tokens processed.", labels, registry=r
        ).labels(m)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Generation tokens processed.", labels, registry=r
        ).labels(m)
        self._success = Counter(
            "vllm:request_success", "Finished requests.", [*labels, "finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token (arrival to first token).",
            labels, registry=r, buckets=TTFT_BUCKETS,
        ).labels(m)  # fmt: skip
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds", "Gap between successive token outputs.",
            labels, registry=r, buckets=TPOT_BUCKETS,
        ).labels(m)  # fmt: skip
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Arrival to the last token used.",
            labels, registry=r, buckets=REQUEST_BUCKETS,
        ).labels(m)  # fmt: skip
        self.queue = Histogram(
            "vllm:request_queue_time_seconds", "Arrival to first scheduled.",
            labels, registry=r, buckets=REQUEST_BUCKETS,
        ).labels(m)  # fmt: skip
        self._rejected = Counter(
            "runtime:requests_rejected",
            "Requests refused for the server's state, not their content (queue_full: 429 past "
            "max_waiting; draining: 503 after SIGTERM).",
            [*labels, "reason"], registry=r,
        )  # fmt: skip
        for reason in REJECT_REASONS:  # at 0 from the start, so rates need no missing series
            self._rejected.labels(m, reason)
        self._model_name = m
        r.register(_EngineCollector(m, stats))

    def finished(self, reason: str) -> None:
        self._success.labels(self._model_name, reason).inc()

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self._model_name, reason).inc()


# --- one response ----------------------------------------------------------------------------


class _Progress:
    """A response in the making: reads the request's outputs, turns them into text, and keeps
    the metrics that follow from them."""

    def __init__(
        self, job: _Job, outputs: AsyncGenerator[TokenOutput, None],
        tokenizer: PreTrainedTokenizerBase, timings: RequestTimings, metrics: _Metrics,
    ) -> None:  # fmt: skip
        self.job, self.outputs, self.timings, self.metrics = job, outputs, timings, metrics
        self.text = _OutputText(tokenizer, job.prompt_ids, job.params.stop)
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # set once the response is complete

    async def next(self) -> str:
        """Wait for the next output; return the text that may be sent now. When the response
        is complete, the request's outputs are closed at once, which aborts it in the engine
        if only a stop string ended it and completes its timings."""
        out = await anext(self.outputs)
        if out.new_token_ids:
            self.completion_tokens += len(out.new_token_ids)
            self._observe_tokens(len(out.new_token_ids))
            self.text.add(out.new_token_ids)
        if self.text.stopped:
            self.finish_reason = "stop"
        elif out.finished:
            self.finish_reason = out.finish_reason or "stop"
        if self.finish_reason is None:
            return self.text.take(final=False)
        await self.outputs.aclose()
        self.metrics.finished(self.finish_reason)
        if self.timings.finished is not None:
            self.metrics.e2e.observe(self.timings.finished - self.timings.arrival)
        return self.text.take(final=True)

    def _observe_tokens(self, count: int) -> None:
        m, t = self.metrics, self.timings
        m.generation_tokens.inc(count)
        # The engine appended this output's time just before handing it over.
        if len(t.token_times) == 1:
            assert t.first_scheduled is not None
            m.prompt_tokens.inc(len(self.job.prompt_ids))
            m.ttft.observe(t.token_times[0] - t.arrival)
            m.queue.observe(t.first_scheduled - t.arrival)
        else:
            m.tpot.observe(t.token_times[-1] - t.token_times[-2])

    def usage(self, final: bool) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": len(self.job.prompt_ids),
            "completion_tokens": self.completion_tokens,
            "total_tokens": len(self.job.prompt_ids) + self.completion_tokens,
        }
        if final:
            t = self.timings

            def ms(start: float | None, end: float | None) -> float | None:
                return None if start is None or end is None else round((end - start) * 1e3, 3)

            usage["timings"] = {
                "queue_ms": ms(t.arrival, t.first_scheduled),
                "prefill_ms": ms(t.first_scheduled, t.first_token),
                "decode_ms": ms(t.first_token, t.finished),
                "e2e_ms": ms(t.arrival, t.finished),
            }
        return usage


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


# --- the server ------------------------------------------------------------------------------


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """Like asyncio.to_thread, but in a daemon thread: Ctrl-C during a long model load exits at
    once instead of waiting for the load (executor threads are joined at exit)."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="model-loader", daemon=True).start()
    return await asyncio.wrap_future(future)


class _Server:
    def __init__(
        self, engine_factory: EngineFactory, served_model_name: str, max_waiting: int,
        api_key: str | None,
    ) -> None:  # fmt: skip
        self.engine_factory = engine_factory
        self.model_name = served_model_name
        self.max_waiting = max_waiting
        self.api_key = api_key
        self.created = int(time.time())
        self.engine: AsyncEngine | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.load_error: BaseException | None = None
        self.loading: asyncio.Task[None] | None = None
        self.metrics = _Metrics(served_model_name, self._stats)
        # One worker: a Hugging Face tokenizer is not safe to call from two threads at once.
        # Off the loop, because encoding a long prompt takes milliseconds every stream waits.
        self.tokenize_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="tokenizer"
        )
        self.chars_per_token = MAX_CHARS_PER_TOKEN  # raised at load if the tokenizer needs it
        self.draining = False  # set on SIGTERM: new requests get 503
        self._in_flight = 0  # completion requests being handled
        self._idle = asyncio.Event()  # set while _in_flight is 0
        self._idle.set()
        self._engine_stopped = False

    def _stats(self) -> EngineStats | None:
        return None if self.engine is None else self.engine.stats()

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        self.loading = asyncio.create_task(self._load())
        yield
        self.loading.cancel()  # stops the waiting only; a load in progress is abandoned
        await asyncio.wait([self.loading])
        await self._stop_engine()
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    async def _stop_engine(self) -> None:
        """Stop the engine once; requests still running in it end with EngineDeadError."""
        if self.engine is not None and not self._engine_stopped:
            self._engine_stopped = True
            await self.engine.stop()

    async def drain(self, timeout_s: float, hurry: asyncio.Event | None = None) -> None:
        """Refuse new requests (503), wait up to `timeout_s` (or until `hurry` is set) for
        those in flight, then end the rest by stopping the engine."""
        self.draining = True
        if self._in_flight:
            log.info("draining %d requests in flight, for up to %g s", self._in_flight, timeout_s)
            waits = [asyncio.create_task(self._idle.wait())]
            if hurry is not None:
                waits.append(asyncio.create_task(hurry.wait()))
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            for task in waits:
                task.cancel()
        if self._in_flight:
            log.warning("ending %d requests still in flight at the drain's end", self._in_flight)
        await self._stop_engine()

    async def _load(self) -> None:
        start = time.perf_counter()
        try:
            core, tokenizer = await _in_daemon_thread(self.engine_factory)
            longest = await _in_daemon_thread(lambda: _longest_token(tokenizer))
        except Exception as exc:
            log.exception("loading the model failed")
            self.load_error = exc
            return
        self.chars_per_token = max(MAX_CHARS_PER_TOKEN, longest)
        engine = AsyncEngine(core, self.max_waiting)
        engine.start()
        self.engine, self.tokenizer = engine, tokenizer
        log.info("model %s loaded in %.2f s", self.model_name, time.perf_counter() - start)

    def _ready(self) -> tuple[AsyncEngine, PreTrainedTokenizerBase]:
        if self.draining:
            raise _shutting_down()
        if self.load_error is not None:
            message = f"Loading the model failed: {self.load_error!r}."
            raise ApiError(503, message, kind="service_unavailable")
        if self.engine is None or self.tokenizer is None:
            message = "The model is still loading; retry once GET /health answers 200."
            raise ApiError(503, message, kind="service_unavailable")
        if not self.engine.healthy:
            message = "The engine has failed; restart the server (see its log)."
            raise ApiError(500, message, kind="internal_server_error")
        return self.engine, self.tokenizer

    def _engine_gone(self, exc: EngineDeadError) -> ApiError:
        if self.draining:  # the drain's time ran out, or a second signal cut it short
            message = "The server shut down before this request finished."
            return ApiError(503, message, kind="service_unavailable")
        return ApiError(500, str(exc), kind="internal_server_error")

    @web.middleware
    async def openai_errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """aiohttp's own errors (no such route, wrong method) and anything unforeseen, with
        OpenAI's error body like every other error."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            message = f"{request.method} {request.path}: {exc.reason}; see GET /openapi.json."
            error = ApiError(exc.status, message, code=exc.reason.lower().replace(" ", "_"),
                             kind=kind)  # fmt: skip
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
            return error.response(allow)
        except ConnectionResetError:  # the client is gone: nobody to answer
            raise
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.path)
            message = f"The server failed to handle the request: {exc!r}."
            return ApiError(500, message, kind="internal_server_error").response({})

    @web.middleware
    async def authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.api_key is not None and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                error = ApiError(
                    401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                )  # fmt: skip
                return error.response({})
        return await handler(request)

    async def get_openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document(self.model_name, self.api_key is not None))

    async def get_health(self, request: web.Request) -> web.Response:
        try:
            self._ready()
        except ApiError as exc:
            return web.Response(status=503, text=str(exc))
        return web.Response(text="ok")

    async def get_models(self, request: web.Request) -> web.Response:
        card: dict[str, Any] = {
            "id": self.model_name, "object": "model", "created": self.created,
            "owned_by": "runtime",
        }  # fmt: skip
        if self.engine is not None:
            card["max_model_len"] = self.engine.max_model_len
            # Clients that send token ids (the harness's random prompts) keep them below it.
            card["vocab_size"] = self.engine.vocab_size
            card["load_breakdown"] = self.engine.core.load_breakdown()
            card["kernels"] = self.engine.core.kernels()
        return web.json_response({"object": "list", "data": [card]})

    async def get_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def post_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def post_chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrival = time.perf_counter()
        headers = {"X-Request-Id": request.headers.get("X-Request-Id") or uuid.uuid4().hex}
        if self.draining:
            self.metrics.rejected("draining")
            return _shutting_down().response(headers)
        self._in_flight += 1
        self._idle.clear()
        try:
            engine, tokenizer = self._ready()
            raw = await self._read_body(request, engine.max_model_len)
            job = await self._parse(raw, chat, engine, tokenizer)
            return await self._generate(request, job, engine, tokenizer, arrival, headers)
        except ApiError as exc:
            return exc.response(headers)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _read_body(self, request: web.Request, max_model_len: int) -> bytes:
        """The body, refused with 413 past `max_body_bytes`, before reading it if its length
        is declared."""
        limit = max_body_bytes(max_model_len, self.chars_per_token)

        def too_large(size: str) -> ApiError:
            message = (
                f"The request body is {size}, over this server's limit of {limit} bytes, which "
                f"holds the longest prompt its {max_model_len}-token context takes."
            )
            return ApiError(413, message, "body", "request_too_large")

        if request.content_length is not None and request.content_length > limit:
            raise too_large(f"{request.content_length} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise too_large(f"more than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_chars(self, chars: int, param: str, max_model_len: int) -> None:
        """Refuse a text prompt too long to fit in any tokenisation, before tokenising it."""
        limit = max_model_len * self.chars_per_token
        if chars > limit:
            raise _too_long(
                param,
                f"The prompt is {chars} characters long, and this model's maximum context "
                f"length of {max_model_len} tokens holds at most {limit} characters (no token "
                f"covers more than {self.chars_per_token}). Shorten the prompt.",
            )

    async def _parse(
        self, raw: bytes, chat: bool, engine: AsyncEngine, tokenizer: PreTrainedTokenizerBase
    ) -> _Job:
        body = _json_object(raw)
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(
                404, f"The model {model!r} does not exist; this server serves "
                f"{self.model_name!r} (GET /v1/models).", "model", "model_not_found",
            )  # fmt: skip
        _check_supported(body)
        stream = _bool(body, "stream")
        options = body.get("stream_options")
        if options is not None and (not isinstance(options, dict) or not stream):
            raise _bad("stream_options", "'stream_options' must be an object, with stream=true.")
        options = options or {}
        if chat:
            messages = _chat_messages(body)
            chars = sum(len(m["role"]) + len(m["content"]) for m in messages)
            self._check_chars(chars, "messages", engine.max_model_len)
            for m in messages:
                _check_unicode(m["role"] + m["content"], "messages")
            prompt_ids = await self._chat_prompt(messages, tokenizer)
        else:
            prompt = _completion_prompt(body.get("prompt"))
            if isinstance(prompt, str):
                self._check_chars(len(prompt), "prompt", engine.max_model_len)
                prompt_ids = await self._encode(prompt, tokenizer)
            elif max(prompt) >= engine.vocab_size:  # the detokeniser cannot even hold it
                message = f"Prompt token ids must be in [0, {engine.vocab_size}): the vocabulary."
                raise _bad("prompt", message)
            else:
                prompt_ids = prompt
        params = _sampling_params(body, chat, len(prompt_ids), engine.max_model_len)
        return _Job(
            chat, prompt_ids, params, stream, options.get("include_usage") is True,
            options.get("continuous_usage_stats") is True,
        )  # fmt: skip

    async def _encode(self, prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
        _check_unicode(prompt, "prompt")
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self.tokenize_pool, tokenizer.encode, prompt)
        if not ids:
            raise _bad("prompt", "The prompt encodes to no tokens; send some text.")
        return list(ids)

    async def _chat_prompt(
        self, messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase
    ) -> list[int]:
        def encode() -> list[int]:
            # Rendered to text, then encoded without special tokens: the template writes them.
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            assert isinstance(text, str)
            return list(tokenizer.encode(text, add_special_tokens=False))

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.tokenize_pool, encode)
        except (ValueError, jinja2.TemplateError) as exc:
            message = f"The chat template could not render the messages: {exc}"
            raise _bad("messages", message) from exc

    async def _generate(
        self, request: web.Request, job: _Job, engine: AsyncEngine,
        tokenizer: PreTrainedTokenizerBase, arrival: float, headers: dict[str, str],
    ) -> web.StreamResponse:  # fmt: skip
        timings = RequestTimings(arrival)
        outputs = engine.generate(job.prompt_ids, job.params, timings)
        progress = _Progress(job, outputs, tokenizer, timings, self.metrics)
        # However the response ends (disconnect, cancellation, error), closing the outputs
        # aborts the request in the engine unless it finished there.
        async with contextlib.aclosing(outputs):
            try:
                text = await progress.next()
            except QueueFull as exc:
                self.metrics.rejected("queue_full")
                kind, code = "rate_limit_error", "rate_limit_exceeded"
                retry = {"Retry-After": str(RETRY_AFTER_S)}
                raise ApiError(429, str(exc), None, code, kind, retry) from exc
            except ValueError as exc:  # the engine refused the prompt
                raise _bad("messages" if job.chat else "prompt", str(exc)) from exc
            except EngineDeadError as exc:
                raise self._engine_gone(exc) from exc
            try:
                if job.stream:
                    return await self._stream(request, job, progress, text, headers)
                while progress.finish_reason is None:
                    text += await progress.next()
            except EngineDeadError as exc:
                raise self._engine_gone(exc) from exc
            finally:
                if progress.finish_reason is None:
                    self.metrics.finished("abort")
        choice: dict[str, Any] = {"index": 0, "logprobs": None}
        if job.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["finish_reason"] = progress.finish_reason
        body = self._head(job, headers, chunk=False)
        body.update(choices=[choice], usage=progress.usage(final=True))
        return web.json_response(body, headers=headers)

    def _head(self, job: _Job, headers: dict[str, str], chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if job.chat else "text_completion"
        return {
            "id": f"{'chatcmpl' if job.chat else 'cmpl'}-{headers['X-Request-Id']}",
            "object": f"{kind}.chunk" if chunk and job.chat else kind,
            "created": int(time.time()),
            "model": self.model_name,
        }

    async def _stream(
        self, request: web.Request, job: _Job, progress: _Progress, text: str,
        headers: dict[str, str],
    ) -> web.StreamResponse:  # fmt: skip
        """Stream the response whose first output gave `text`."""
        response = web.StreamResponse(
            headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        head = self._head(job, headers, chunk=True)
        first_chunk = True
        try:
            # The client may be gone before the headers leave (a run stopped mid-level).
            await response.prepare(request)
            while True:
                done = progress.finish_reason is not None
                # With per-chunk usage a chunk without text still tells the client when a token
                # left the server (its text may be held back: a partial character or stop).
                if text or done or job.continuous_usage:
                    choice: dict[str, Any] = {"index": 0, "logprobs": None}
                    if job.chat:
                        role = {"role": "assistant"} if first_chunk else {}
                        choice["delta"] = {**role, "content": text}
                    else:
                        choice["text"] = text
                    choice["finish_reason"] = progress.finish_reason
                    chunk = {**head, "choices": [choice]}
                    if job.continuous_usage:
                        chunk["usage"] = progress.usage(final=done)
                    await response.write(_sse(chunk))
                    first_chunk = False
                if done:
                    break
                text = await progress.next()
            tail = b"data: [DONE]\n\n"
            if job.include_usage:
                tail = _sse({**head, "choices": [], "usage": progress.usage(final=True)}) + tail
            await response.write(tail)
        except EngineDeadError as exc:
            error = self._engine_gone(exc)
            await response.write(_sse(error.body()) + b"data: [DONE]\n\n")
        except ConnectionResetError:  # the client went away; closing the outputs aborts
            return response
        await response.write_eof()
        return response


_SERVER = web.AppKey("server", _Server)

# The routes, with the _Server method that answers each (runtime/openapi.py describes them).
ROUTES_POST = {
    "/v1/completions": "post_completions",
    "/v1/chat/completions": "post_chat_completions",
}
ROUTES_GET = {
    "/v1/models": "get_models",
    "/health": "get_health",
    "/metrics": "get_metrics",
    "/openapi.json": "get_openapi",
}


def build_app(
    engine_factory: EngineFactory,
    served_model_name: str,
    max_waiting: int = 0,
    api_key: str | None = None,
) -> web.Application:
    """The server as an aiohttp application. `engine_factory` runs in a thread when the app
    starts; `max_waiting` (0: unbounded) caps requests waiting beyond those running (429)."""
    server = _Server(engine_factory, served_model_name, max_waiting, api_key)
    # The body limit depends on the model's context length, known once it has loaded: the
    # completion handlers enforce it (`_read_body`); no other route reads a body.
    app = web.Application(middlewares=[server.openai_errors, server.authenticate])
    app[_SERVER] = server
    app.cleanup_ctx.append(server.lifecycle)
    for path, post in ROUTES_POST.items():
        app.router.add_post(path, getattr(server, post))
    for path, get in ROUTES_GET.items():
        app.router.add_get(path, getattr(server, get))
    return app


async def drain(app: web.Application, timeout_s: float, hurry: asyncio.Event | None = None) -> None:
    """Shut `app` down gently: new completion requests get 503 (and /health turns 503) while
    the socket stays open, those in flight get up to `timeout_s` (less if `hurry` is set) to
    finish, and the engine is stopped, which ends the rest with an error (a stream's last
    event, or a 503). Clean the runner up after it."""
    await app[_SERVER].drain(timeout_s, hurry)


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Listen on host:port (port 0 picks a free one); the runner, to clean up, and the base
    URL."""
    # Cancelling handlers on disconnect aborts a request at once, even one still queued or in
    # prefill, rather than at its next write. No access log: a line per request costs the loop
    # time every stream waits for. The shutdown timeout only lets responses that `drain` has
    # just ended write their last bytes.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    return runner, f"http://{f'[{host}]' if ':' in host else host}:{bound}"


async def serve(
    engine_factory: EngineFactory,
    served_model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_waiting: int = 0,
    api_key: str | None = None,
    drain_timeout_s: float = 30.0,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain for up to `drain_timeout_s` (see `drain`; a
    second signal cuts it short). Raises ModelLoadError if the model cannot be loaded and
    EngineFailedError if the engine fails while serving, so that a managed server exits
    instead of answering 503 or 500 forever."""
    warning = exposure_warning(host, api_key)
    if warning is not None:
        log.warning("%s", warning)
    app = build_app(engine_factory, served_model_name, max_waiting, api_key)
    runner, url = await start_server(app, host, port)
    log.info("listening on %s; loading the model", url)
    server = app[_SERVER]
    assert server.loading is not None
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (hurry if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([stopped, server.loading], return_when=asyncio.FIRST_COMPLETED)
        if server.load_error is not None:
            raise ModelLoadError(f"loading the model failed: {server.load_error!r}") from (
                server.load_error
            )
        if server.engine is not None:  # loaded, not stopped while loading
            failed = asyncio.create_task(server.engine.wait_failed())
            await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
            if failed.done():  # a dead engine has nothing to drain
                raise EngineFailedError(str(failed.result())) from failed.result()
            failed.cancel()
        await stopped
        await drain(app, drain_timeout_s, hurry)
    finally:
        stopped.cancel()
        await runner.cleanup()
