from __future__ import annotations

import dataclasses

import pytest

from bench.config import SloConfig
from bench.metrics import Distribution, summarize
from bench.records import SCHEMA_VERSION, RequestRecord

NO_SLO = SloConfig(ttft_ms=None, tpot_ms=None, e2e_ms=None, percentile=99.0, success=None)


def _req(ok: bool = True, ttft: float = 100.0, out: int = 11, e2e: float = 200.0) -> RequestRecord:
    return RequestRecord(
        schema_version=SCHEMA_VERSION, run_id="r", scenario="s", repeat=0, level=0,
        input_tokens=64, output_tokens_requested=out, concurrency=1, request_rate=None, index=0,
        group_id=None, group_position=None, ramp_up=False, request_id="x", worker=0, ok=ok,
        error=None if ok else "refused", error_message=None,
        http_status=200 if ok else 429, prompt_tokens=64 if ok else None,
        output_tokens=out if ok else None, reasoning_tokens=None, output_tokens_source="usage",
        token_attribution="usage", events=out, scheduled_s=0.0, sent_s=0.0,
        first_token_s=0.1, end_s=0.2, send_lag_ms=0.0, ttft_ms=ttft if ok else None,
        ttfo_ms=None, tpot_ms=(e2e - ttft) / (out - 1) if ok else None,
        e2e_ms=e2e if ok else None, ttft_from_scheduled_ms=ttft if ok else None,
        e2e_from_scheduled_ms=e2e if ok else None,
        itl_ms=[10.0] * (out - 1) if ok else [], event_ms=[], event_tokens=[],
        server_queue_ms=None, server_prefill_ms=None, server_decode_ms=None, server_e2e_ms=None,
    )  # fmt: skip


def test_percentiles_use_linear_interpolation() -> None:
    d = Distribution.of([1.0, 2.0, 3.0, 4.0])
    assert (d.mean, d.p50, d.p90) == (2.5, 2.5, pytest.approx(3.7))


def test_empty_distribution_is_all_none() -> None:
    assert Distribution.of([]) == Distribution(None, None, None, None)


def test_failed_requests_are_counted_not_dropped() -> None:
    m = summarize([_req(), _req(), _req(ok=False)], duration_s=2.0, slo=NO_SLO)
    assert (m.sent, m.completed, m.failed) == (3, 2, 1)
    assert m.success_rate == pytest.approx(2 / 3)
    assert m.errors == {"refused": 1}
    # Throughput counts only what was delivered.
    assert m.output_throughput == pytest.approx(22 / 2.0)
    assert m.request_throughput == pytest.approx(1.0)
    assert m.ttft_ms.p50 == 100.0


def test_itl_pools_every_gap_and_tpot_excludes_the_first_token() -> None:
    m = summarize([_req(e2e=300.0), _req(e2e=200.0)], duration_s=1.0, slo=NO_SLO)
    assert m.itl_ms.mean == 10.0
    assert m.tpot_ms.mean == pytest.approx((20.0 + 10.0) / 2)


def test_goodput_counts_only_requests_meeting_every_slo() -> None:
    reqs = [_req(ttft=50.0), _req(ttft=150.0), _req(ttft=90.0, e2e=900.0)]
    m = summarize(
        reqs, duration_s=1.0, slo=dataclasses.replace(NO_SLO, ttft_ms=100.0, e2e_ms=500.0)
    )
    assert m.goodput == 1.0
    assert summarize(reqs, 1.0, NO_SLO).goodput is None


def test_server_prompt_count_wins_over_the_intended_length() -> None:
    req = dataclasses.replace(_req(), prompt_tokens=70)
    assert summarize([req], 1.0, NO_SLO).total_input_tokens == 70
