"""Ramp-up (scenario.ramp_up_s): closed-loop users start staggered, the open-loop arrival rate
rises linearly, and the requests sent meanwhile are recorded but left out of every statistic."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from bench import runner, workload
from bench.client import RequestResult
from bench.compose import compose
from bench.config import BenchConfig, ConfigError, LoadLevel, SloConfig
from bench.levels import level_requests, level_stats
from bench.load import run_level
from bench.metrics import summarize
from bench.records import REQUESTS_SCHEMA, RUNS_SCHEMA, to_table
from bench.workload import RequestSpec
from tests.synthetic import request_record, run_record

NO_SLO = SloConfig(ttft_ms=None, tpot_ms=None, e2e_ms=None, percentile=99.0, success=None)


def _offsets(cfg: BenchConfig) -> list[float]:
    specs = workload.build(cfg.scenario, cfg.workload, cfg.seed, text=False).batches[0, 0]
    return [s.offset_s for s in specs]


def _open(*overrides: str) -> BenchConfig:
    return compose(
        "scenario.request_rate=100", "scenario.num_requests=2000", "scenario.repeats=1",
        *overrides,
    )  # fmt: skip


def test_the_open_loop_arrival_rate_rises_linearly_over_the_ramp() -> None:
    offsets = np.array(_offsets(_open("scenario.ramp_up_s=4")))
    assert offsets[0] == 0.0 and np.all(np.diff(offsets) >= 0)
    # Intensity 100 t / 4 per second: 50 arrivals expected in the first 2 s, 150 in the next 2,
    # then the full 100 per second.
    counts = [np.sum((offsets >= a) & (offsets < b)) for a, b in ((0, 2), (2, 4), (4, 8))]
    assert abs(counts[0] - 50) < 25 and abs(counts[1] - 150) < 40
    assert abs(counts[2] / 4 - 100) < 12


def test_the_ramp_moves_the_same_seeded_arrivals() -> None:
    steady, ramped = _offsets(_open()), _offsets(_open("scenario.ramp_up_s=4"))
    assert ramped == _offsets(_open("scenario.ramp_up_s=4"))
    # After the ramp every arrival is the full-rate one, 2 s (half the ramp) later.
    late = [(s, r) for s, r in zip(steady, ramped, strict=True) if r > 4]
    assert late and all(r == pytest.approx(s + 2.0) for s, r in late)


def test_a_ramp_changes_the_digest() -> None:
    def digest(cfg: BenchConfig) -> str:
        return workload.build(cfg.scenario, cfg.workload, cfg.seed, text=False).digest

    assert digest(compose("scenario.ramp_up_s=2")) != digest(compose())


@pytest.mark.parametrize("override", ["scenario=trace_replay", "scenario=capacity"])
def test_traces_and_capacity_searches_take_no_ramp(override: str) -> None:
    with pytest.raises(ConfigError, match=r"^scenario\.ramp_up_s: .*set scenario\.ramp_up_s=0$"):
        compose(override, "scenario.ramp_up_s=1", "slo.ttft_ms=1000")


class _Recorder:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.seen: list[tuple[RequestSpec, RequestResult]] = []

    async def send(self, spec: RequestSpec, scheduled_s: float) -> RequestResult:
        sent_s = time.perf_counter()
        await asyncio.sleep(self.seconds)
        return RequestResult("id", scheduled_s, sent_s, time.perf_counter(), ok=True)

    def keep(self, spec: RequestSpec, result: RequestResult) -> None:
        self.seen.append((spec, result))


def test_closed_loop_users_start_evenly_staggered_over_the_ramp() -> None:
    recorder = _Recorder(seconds=0.4)
    specs = [RequestSpec(i, [1], 1, 1, 0.0) for i in range(8)]
    level = LoadLevel(0, 1, 1, 4, None)
    out = asyncio.run(run_level(recorder.send, specs, level, recorder.keep, 3, ramp_up_s=0.2))
    sends = sorted((r.sent_s - out.started_s, s.ramp_up) for s, r in recorder.seen)
    firsts = [t for t, _ in sends[:4]]
    assert firsts == pytest.approx([0.0, 0.05, 0.1, 0.15], abs=0.02)
    assert [ramp for _, ramp in sends] == [True] * 4 + [False] * 4


def test_open_loop_requests_scheduled_within_the_ramp_are_marked() -> None:
    recorder = _Recorder(seconds=0.001)
    offsets = [0.0, 0.05, 0.09, 0.11, 0.2]
    specs = [RequestSpec(i, [1], 1, 1, t) for i, t in enumerate(offsets)]
    level = LoadLevel(0, 1, 1, None, 10.0)
    asyncio.run(run_level(recorder.send, specs, level, recorder.keep, 3, ramp_up_s=0.1))
    marks = {s.index: s.ramp_up for s, _ in recorder.seen}
    assert marks == {0: True, 1: True, 2: True, 3: False, 4: False}


def test_summarize_leaves_ramp_requests_and_their_time_out() -> None:
    requests = [
        request_record(index=0, ramp_up=True, sent_s=0.0, end_s=1.0, ttft_ms=900.0),
        request_record(index=1, ramp_up=False, sent_s=0.5, end_s=2.0, ttft_ms=10.0),
        request_record(index=2, ramp_up=False, sent_s=1.0, end_s=2.5, ttft_ms=20.0),
    ]
    m = summarize(requests, duration_s=2.5, slo=NO_SLO)
    assert (m.sent, m.completed) == (2, 2)
    assert m.ttft_ms.p50 == 15.0
    assert m.duration_s == 2.0  # the first steady send (0.5) to the last byte (2.5)
    assert m.request_throughput == 1.0


def test_level_statistics_leave_ramp_requests_out() -> None:
    rows = [
        request_record(index=0, ramp_up=True, ttft_ms=900.0),
        request_record(index=1, ramp_up=False, ttft_ms=10.0),
        request_record(index=2, ramp_up=None, ttft_ms=20.0),  # a file older than the column
    ]
    requests = to_table(rows, REQUESTS_SCHEMA).to_pandas()
    runs = to_table([run_record()], RUNS_SCHEMA).to_pandas()
    assert sorted(level_requests(requests, runs)["index"]) == [1, 2]
    (stats,) = level_stats(runs, requests)
    assert (stats.sent, stats.ttft_ms.p50) == (2, 15.0)


@pytest.mark.slow
def test_a_run_records_the_ramps_requests_and_its_row_leaves_them_out(tmp_path: Path) -> None:
    cfg = compose(
        "target=refserver", f"results_dir={tmp_path}", "progress=false", "scenario.repeats=1",
        "scenario.concurrency=4", "scenario.num_requests=40", "scenario.ramp_up_s=0.6",
        "scenario.output_tokens=16",
    )  # fmt: skip
    result = runner.run(cfg)
    ramp = [r for r in result.requests if r.ramp_up]
    steady = [r for r in result.requests if not r.ramp_up]
    (row,) = result.runs
    assert ramp and steady and all(r.ok for r in result.requests)
    # User k starts 0.15 k s in: until then at most k requests are in flight, then 4.
    start = min(r.sent_s for r in result.requests)
    in_flight = [
        (r.sent_s - start, sum(q.sent_s <= r.sent_s < q.end_s for q in result.requests))
        for r in result.requests
    ]
    assert all(n <= 1 + int((t + 0.02) / 0.15) for t, n in in_flight)
    assert max(n for _, n in in_flight) == 4
    assert row.sent == len(steady) and row.num_requests == 40
    assert row.duration_s == pytest.approx(
        max(r.end_s for r in result.requests) - min(r.sent_s for r in steady)
    )
