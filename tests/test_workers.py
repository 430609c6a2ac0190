"""Client workers (client.workers): how a level is split, clocks, and whole runs on 2 processes."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import runner, store, workers
from bench.client import RequestResult
from bench.compose import compose
from bench.config import ConfigError, LoadLevel
from bench.refserver import read_truth_log
from bench.workload import RequestSpec
from tests.conftest import RefServer


def _specs(n: int, offsets: bool = False, turns: int = 1) -> list[RequestSpec]:
    return [
        RequestSpec(
            i,
            [1, 2, 3],
            3,
            8,
            0.01 * i if offsets else 0.0,
            i // turns if turns > 1 else None,
            i % turns if turns > 1 else None,
        )
        for i in range(n)
    ]


def _closed(users: int) -> LoadLevel:
    return LoadLevel(0, 3, 8, users, None)


@given(st.integers(1, 40), st.integers(1, 8), st.integers(1, 200))
def test_a_closed_loop_level_splits_its_users_and_requests_without_loss(
    users: int, n: int, requests: int
) -> None:
    specs = _specs(requests)
    shares = workers.split(_closed(users), specs, n, conversations=False)
    sent = sorted(s.index for share in shares for s in share.specs)
    assert sent == list(range(requests))  # every request once
    held = sorted(u for share in shares for u in share.part.users)
    assert len(set(held)) == len(held) and set(held) <= set(range(users))
    if requests >= users:  # a worker is left out only when its users would have nothing to send
        assert held == list(range(users))
    assert len(shares) <= min(n, users)
    for share in shares:  # each worker's requests follow its share of the users
        fraction = len(share.part.users) / users
        assert abs(len(share.specs) - fraction * requests) <= len(share.part.users)


def test_a_conversation_stays_on_one_worker() -> None:
    specs = _specs(30, turns=3)  # 10 conversations of 3 turns
    shares = workers.split(_closed(4), specs, 2, conversations=True)
    for share in shares:
        groups = {s.group_id for s in share.specs}
        assert sum(len([s for s in specs if s.group_id == g]) for g in groups) == len(share.specs)
    assert {s.group_id for sh in shares for s in sh.specs} == set(range(10))


def test_an_open_loop_level_keeps_one_schedule_and_divides_its_cap() -> None:
    specs = _specs(10, offsets=True)
    shares = workers.split(LoadLevel(0, 3, 8, 5, 20.0), specs, 2, conversations=False)
    assert [s.offset_s for s in shares[0].specs] == [s.offset_s for s in specs[0::2]]
    assert [s.offset_s for s in shares[1].specs] == [s.offset_s for s in specs[1::2]]
    assert [sh.part.cap for sh in shares] == [3, 2]
    uncapped = workers.split(LoadLevel(0, 3, 8, None, 20.0), specs, 3, conversations=False)
    assert [sh.part.cap for sh in uncapped] == [None] * 3


def test_a_remote_clock_offset_is_found_within_its_uncertainty() -> None:
    offset = 123.456

    def remote_now() -> float:
        time.sleep(0.0002)  # the request's way there
        now = time.perf_counter() + offset
        time.sleep(0.0005)  # and the reply's way back, slower
        return now

    clock = workers.measure_clock(remote_now)
    assert abs(clock.offset_s - offset) <= clock.uncertainty_s
    assert 0.0003 < clock.uncertainty_s < 0.05
    result = RequestResult(
        "r", 10.0 + offset, 10.5 + offset, 12.0 + offset, event_s=[11.0 + offset]
    )
    shifted = workers.to_coordinator(result, clock)
    assert shifted.sent_s == pytest.approx(10.5 - (clock.offset_s - offset))
    assert shifted.event_s[0] - shifted.sent_s == pytest.approx(0.5)


def test_auto_picks_workers_for_the_heaviest_level_within_the_free_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda _: set(range(16)))
    heavy = compose("client.workers=auto", "scenario.concurrency=[8,300]")
    assert heavy.client.workers is None
    assert workers.auto_workers(heavy, server_on_this_host=False) == 5  # ceil(300 / 64)
    assert workers.auto_workers(heavy, server_on_this_host=True) == 5  # 8 cores left
    huge = compose("client.workers=auto", "scenario.concurrency=2000")
    assert workers.auto_workers(huge, server_on_this_host=True) == 8
    rate = compose("client.workers=auto", "scenario.request_rate=200", "scenario.output_tokens=256")
    assert workers.auto_workers(rate, server_on_this_host=False) == 6  # 51,200 tok/s / 10,000
    assert workers.auto_workers(compose("client.workers=auto"), server_on_this_host=True) == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("client.workers=0", "client.workers"),
        ("client.workers=two", "client.workers"),
        ("client.backend=kubernetes", "local, ray"),
    ],
)
def test_a_bad_worker_setting_names_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose(override)


class _LosesOne:
    """Two workers; the second reports nothing and is gone."""

    def __init__(self) -> None:
        self.clocks = [workers.SAME_CLOCK, workers.SAME_CLOCK]
        self.start_ahead_s = 0.0

    def sync_clocks(self) -> None:
        pass

    async def run(
        self, jobs: Sequence[workers.Job], on_report: Callable[[int, workers.Report], None]
    ) -> list[workers.WorkerLevel]:
        for spec in jobs[0].specs:
            on_report(0, (spec.index, False, RequestResult("x", 0.0, 0.0, 1.0, ok=True)))
        done = workers.Done(1.0, None, [(0.5, 0.001)])
        return [
            workers.WorkerLevel(0, workers.SAME_CLOCK, done),
            workers.WorkerLevel(1, workers.SAME_CLOCK, lost="client worker 1 exited with code -9"),
        ]

    async def close(self) -> None:
        pass


def test_a_lost_worker_stops_the_level_early_and_keeps_the_others_results() -> None:
    got: list[int] = []
    outcome, ends = asyncio.run(
        workers.run_level_on(
            _LosesOne(), _specs(8), _closed(4), lambda s, r, w: got.append(s.index),
            conversations=False, ramp_up_s=0.0, think_time_s=0.0,
            max_consecutive_connection_errors=3,
        )
    )  # fmt: skip
    assert sorted(got) == [0, 2, 4, 6]
    assert outcome.stopped_early == "client worker 1 exited with code -9"
    assert ends[0].lag == [(0.5, 0.001)]


# --- whole runs on two worker processes --------------------------------------------------


def _worker_run(tmp_path: Path, srv: RefServer, *overrides: str) -> store.StoredRun:
    cfg = compose(
        "target=openai", f"target.base_url={srv.url}", "target.model=refserver",
        f"results_dir={tmp_path}", "progress=false", "scenario.repeats=1",
        "scenario.output_tokens=32", "scenario.warmup_requests=4", "client.workers=2",
        *overrides,
    )  # fmt: skip
    result = runner.run(cfg)
    assert result.status == "complete", result.reason
    return store.load(result.run_dir)


@pytest.mark.slow
def test_two_workers_record_every_request_once_with_exact_tokens(
    tmp_path: Path, refserver: Callable[..., RefServer]
) -> None:
    srv = refserver("--ttft-ms", "20", "--itl-ms", "5")
    data = _worker_run(tmp_path, srv, "scenario.concurrency=[8,32]", "scenario.num_requests=96")
    reqs, runs = data.requests, data.runs
    truth = {t.request_id: t for t in read_truth_log(srv.truth_log)}
    assert len(reqs) == 2 * 96 and reqs["request_id"].is_unique
    assert set(reqs["request_id"]) <= set(truth)  # each one the server saw
    for _, level in reqs.groupby("level"):
        assert sorted(level["index"]) == list(range(96))
    assert reqs["ok"].all() and (reqs["output_tokens"] == 32).all()
    assert (reqs["output_tokens"] == [truth[r].completion_tokens for r in reqs["request_id"]]).all()
    assert set(reqs["worker"]) == {0, 1}
    # Each worker sent in proportion to its users, and never more streams than it holds.
    assert reqs.groupby("worker").size().tolist() == [96, 96]
    assert (runs["workers"] == 2).all()
    for col in ("worker_loop_lag_ms_p99", "worker_send_lag_ms_p99", "worker_clock_offset_ms"):
        assert runs[col].map(len).tolist() == [2, 2]
    assert runs["loop_lag_ms_p99"].tolist() == runs["worker_loop_lag_ms_p99"].map(max).tolist()
    assert set(data.telemetry["source"]) >= {"client0", "client1"}
    # TTFT against the server's own: within a few ms, as with one process.
    errors = [r.ttft_ms - truth[r.request_id].ttft_s * 1e3 for r in reqs.itertuples()]
    assert 0.0 < sorted(errors)[len(errors) // 2] < 10.0


@pytest.mark.slow
def test_two_workers_keep_one_open_loop_schedule(
    tmp_path: Path, refserver: Callable[..., RefServer]
) -> None:
    srv = refserver("--ttft-ms", "5", "--itl-ms", "1")
    data = _worker_run(
        tmp_path, srv, "scenario.request_rate=40", "scenario.num_requests=80",
        "scenario.output_tokens=4",
    )  # fmt: skip
    reqs = data.requests.sort_values("index")
    assert set(reqs["worker"]) == {0, 1}
    assert (reqs["worker"] == reqs["index"] % 2).all()
    # The intended send times are the one Poisson schedule, whichever worker sent each request:
    # in the order of the requests, at about the rate asked for.
    scheduled = reqs["scheduled_s"].to_numpy()
    assert (scheduled[1:] >= scheduled[:-1]).all()
    assert 20 < (len(scheduled) - 1) / (scheduled[-1] - scheduled[0]) < 80
    assert reqs["send_lag_ms"].median() < 2.0


@pytest.mark.slow
def test_a_worker_killed_mid_level_leaves_a_partial_run_with_every_finished_request(
    tmp_path: Path, refserver: Callable[..., RefServer]
) -> None:
    srv = refserver("--ttft-ms", "5", "--itl-ms", "5")
    me = psutil.Process()

    port = int(srv.url.rsplit(":", 1)[1])

    def streaming_to_the_server(p: psutil.Process) -> bool:
        try:
            return any(c.raddr and c.raddr.port == port for c in p.net_connections("tcp"))
        except psutil.Error:
            return False

    def kill_one_worker() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = srv.truth_log.read_text().count("\n") if srv.truth_log.exists() else 0
            kids = [p for p in me.children() if streaming_to_the_server(p)]
            if done >= 12 and len(kids) == 2:  # the two workers, each with its streams open
                kids[1].kill()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    cfg = compose(
        "target=openai", f"target.base_url={srv.url}", "target.model=refserver",
        f"results_dir={tmp_path}", "progress=false", "scenario.repeats=1",
        "scenario.output_tokens=40", "scenario.warmup_requests=2", "client.workers=2",
        "scenario.concurrency=4", "scenario.num_requests=160",
    )  # fmt: skip
    result = runner.run(cfg)
    killer.join()
    assert result.status == "partial"
    assert result.reason is not None and "client worker" in result.reason
    data = store.load(result.run_dir)
    assert 0 < len(data.requests) < 160 and data.requests["request_id"].is_unique
    assert set(data.requests["worker"]) == {0, 1}
    assert data.runs["status"].tolist() == ["partial"]
    assert dataclasses.asdict(result.runs[0])["sent"] == len(data.requests)
