"""Summary metrics of one load level, with vLLM `bench serve`'s definitions.

Latencies are over successful requests; ITL pools every per-token gap of every successful
request; throughputs divide by the level's wall time (first send to last byte). Failed requests
are counted, never dropped: success_rate = completed / sent. TTFO is over the successful requests
that streamed reasoning before their answer, the only ones that have one.

Requests sent during a ramp-up (`ramp_up`, scenario.ramp_up_s) are left out of every figure:
counts, latencies and throughputs are the steady state's, and the wall time runs from the first
steady request's send to the level's last byte.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.config import SloConfig
from bench.records import RequestRecord

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Distribution:
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if len(values) == 0:
            return cls(None, None, None, None)
        # numpy's default (linear) interpolation, as vLLM's bench serve.
        p50, p90, p99 = (float(x) for x in np.percentile(values, PERCENTILES))
        return cls(float(np.mean(values)), p50, p90, p99)


@dataclass(frozen=True)
class LevelMetrics:
    duration_s: float
    sent: int
    completed: int
    failed: int
    success_rate: float | None
    errors: dict[str, int]
    total_input_tokens: int
    total_output_tokens: int
    output_throughput: float  # output tokens/s over the level's wall time
    request_throughput: float  # completed requests/s
    total_token_throughput: float
    goodput: float | None  # requests/s meeting every SLO; None when no SLO is set
    ttft_ms: Distribution
    ttfo_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2e_ms: Distribution
    ttft_from_scheduled_ms: Distribution
    e2e_from_scheduled_ms: Distribution
    send_lag_ms: Distribution


def _meets(r: RequestRecord, slo: SloConfig) -> bool:
    checks = ((r.ttft_ms, slo.ttft_ms), (r.tpot_ms, slo.tpot_ms), (r.e2e_ms, slo.e2e_ms))
    # A request too short to have a TPOT cannot miss a TPOT objective.
    return all(bound is None or value is None or value <= bound for value, bound in checks)


def summarize(requests: Sequence[RequestRecord], duration_s: float, slo: SloConfig) -> LevelMetrics:
    """The level's figures; `duration_s` is its wall time, which a ramp-up shortens (above)."""
    steady = [r for r in requests if not r.ramp_up]
    if steady and len(steady) < len(requests):
        duration_s = max(r.end_s for r in requests) - min(r.sent_s for r in steady)
    requests = steady
    ok = [r for r in requests if r.ok]
    duration = max(duration_s, 1e-9)
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    # The server's count when it reports one, as it may tokenise text prompts differently.
    in_tokens = sum(r.input_tokens if r.prompt_tokens is None else r.prompt_tokens for r in ok)
    has_slo = any(v is not None for v in (slo.ttft_ms, slo.tpot_ms, slo.e2e_ms))

    def values(name: str) -> list[float]:
        return [v for r in ok if (v := getattr(r, name)) is not None]

    return LevelMetrics(
        duration_s=duration_s,
        sent=len(requests),
        completed=len(ok),
        failed=len(requests) - len(ok),
        success_rate=len(ok) / len(requests) if requests else None,
        errors=dict(Counter(r.error for r in requests if r.error)),
        total_input_tokens=in_tokens,
        total_output_tokens=out_tokens,
        output_throughput=out_tokens / duration,
        request_throughput=len(ok) / duration,
        total_token_throughput=(in_tokens + out_tokens) / duration,
        goodput=sum(_meets(r, slo) for r in ok) / duration if has_slo else None,
        ttft_ms=Distribution.of(values("ttft_ms")),
        ttfo_ms=Distribution.of(values("ttfo_ms")),
        tpot_ms=Distribution.of(values("tpot_ms")),
        itl_ms=Distribution.of([g for r in ok for g in r.itl_ms]),
        e2e_ms=Distribution.of(values("e2e_ms")),
        ttft_from_scheduled_ms=Distribution.of(values("ttft_from_scheduled_ms")),
        e2e_from_scheduled_ms=Distribution.of(values("e2e_from_scheduled_ms")),
        send_lag_ms=Distribution.of([r.send_lag_ms for r in requests]),
    )
