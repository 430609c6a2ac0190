"""Trace replay: Mooncake's JSONL request traces, each request sent at its own time.

A trace line is `{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}`.
Each hash id names one block of BLOCK_TOKENS prompt tokens, so requests that share leading ids
share a prefix, as the trace's users did. The harness cannot know the real tokens, only which
were equal: a block's token ids are a pure function of (seed, hash id), equal ids give equal
tokens and different ids different ones, and a prompt is its blocks in order, cut to
input_length. Prompts are token ids, so every length is exact.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.config import ConfigError

BLOCK_TOKENS = 512  # Mooncake's block: the unit its hash ids count in


@dataclass(frozen=True)
class TraceRequest:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True)
class Trace:
    path: str
    sha256: str  # of the file's bytes: the workload hash covers the trace itself
    requests: tuple[TraceRequest, ...]


@dataclass(frozen=True)
class Summary:
    """What a replay's load level is named by (bench.config sets the level from it)."""

    requests: int  # replayed: the trace's first lines, at most scenario.num_requests
    input_tokens: int  # mean, rounded
    output_tokens: int  # mean, rounded
    request_rate: float  # mean over the replayed span, after time_scale, 3 digits


def load(path: str) -> Trace:
    """The trace at `path`; a bad line raises ConfigError naming the file and the line."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"scenario.trace_path: cannot read {path!r} ({exc.strerror}); relative paths start "
            "from the working directory, the sample trace is scenarios/data/trace.jsonl"
        ) from None
    return _parse(path, hashlib.sha256(data).hexdigest(), data)


@functools.lru_cache(maxsize=4)
def _parse(path: str, sha256: str, data: bytes) -> Trace:
    name = Path(path).name
    requests: list[TraceRequest] = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{name} line {number}: not JSON ({exc.msg})") from None
        request = _request(row, f"{name} line {number}")
        if requests and request.timestamp_ms < requests[-1].timestamp_ms:
            raise ConfigError(
                f"{name} line {number}: timestamp {request.timestamp_ms} is before the line "
                f"above's ({requests[-1].timestamp_ms}); a trace is in the order it is sent"
            )
        requests.append(request)
    if len(requests) < 2:
        raise ConfigError(f"{name}: a trace needs at least two requests, found {len(requests)}")
    return Trace(path, sha256, tuple(requests))


def _request(row: object, where: str) -> TraceRequest:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("timestamp", "input_length", "output_length", "hash_ids"):
        if key not in row:
            raise ConfigError(f"{where}: missing {key!r} (Mooncake's trace format)")
    stamp, n_in, n_out, ids = (
        row["timestamp"],
        row["input_length"],
        row["output_length"],
        row["hash_ids"],
    )
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or stamp < 0:
        raise ConfigError(f"{where}: 'timestamp' must be milliseconds >= 0, got {stamp!r}")
    for key, value in (("input_length", n_in), ("output_length", n_out)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {key!r} must be an integer >= 1, got {value!r}")
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
    ):
        raise ConfigError(f"{where}: 'hash_ids' must be a list of integers >= 0")
    if len(ids) * BLOCK_TOKENS < n_in:
        raise ConfigError(
            f"{where}: input_length {n_in} needs {math.ceil(n_in / BLOCK_TOKENS)} blocks of "
            f"{BLOCK_TOKENS} tokens, but hash_ids has {len(ids)}"
        )
    return TraceRequest(float(stamp), n_in, n_out, tuple(ids))


def summary(trace: Trace, limit: int, time_scale: float) -> Summary:
    """The replay of the trace's first `limit` requests with gaps scaled by `time_scale`."""
    replayed = trace.requests[:limit]
    span_s = (replayed[-1].timestamp_ms - replayed[0].timestamp_ms) / 1000.0 * time_scale
    if span_s <= 0:
        raise ConfigError(
            f"scenario.trace_path: the replayed requests of {Path(trace.path).name} all share "
            "one timestamp, so they have no rate; replay more lines (scenario.num_requests)"
        )
    return Summary(
        requests=len(replayed),
        input_tokens=round(float(np.mean([r.input_length for r in replayed]))),
        output_tokens=round(float(np.mean([r.output_length for r in replayed]))),
        # Three digits: it names the level ("882/39 3.59/s"); the sends follow the trace.
        request_rate=float(f"{(len(replayed) - 1) / span_s:.3g}"),
    )


def offsets(trace: Trace, n: int, time_scale: float) -> list[float]:
    """Send times of the first `n` requests, seconds after the first one's."""
    first = trace.requests[0].timestamp_ms
    return [(r.timestamp_ms - first) / 1000.0 * time_scale for r in trace.requests[:n]]


class Blocks:
    """Token ids of hash blocks: each a pure function of (seed, hash id), drawn once."""

    def __init__(self, seed: int, token_id_low: int, token_id_high: int) -> None:
        self.seed, self.low, self.high = seed, token_id_low, token_id_high
        self._drawn: dict[int, list[int]] = {}

    def block(self, hash_id: int) -> list[int]:
        if hash_id not in self._drawn:
            rng = np.random.default_rng([self.seed, hash_id, 29])
            ids = rng.integers(self.low, self.high, size=BLOCK_TOKENS)
            self._drawn[hash_id] = [int(t) for t in ids]
        return self._drawn[hash_id]

    def prompt(self, request: TraceRequest) -> list[int]:
        ids = [t for h in request.hash_ids for t in self.block(h)]
        return ids[: request.input_length]
