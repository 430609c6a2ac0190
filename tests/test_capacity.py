"""The capacity search: verdicts with intervals, the search's path, and a known capacity found
exactly on the reference server."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import capacity
from bench.compare import Loaded, _capacity
from bench.compose import compose
from bench.config import BenchConfig, ConfigError
from bench.records import RequestRecord
from bench.report import capacity_line
from tests.synthetic import request_record, run_record, side


def _config(*overrides: str) -> BenchConfig:
    return compose("scenario=capacity", "slo.ttft_ms=100", *overrides)


def _requests(n: int, slow: int, failed: int = 0, slow_ms: float = 500.0) -> list[RequestRecord]:
    def one(ttft: float | None, ok: bool = True) -> RequestRecord:
        error = None if ok else "http"
        return request_record(ok=ok, error=error, ttft_ms=ttft, ttft_from_scheduled_ms=ttft)

    fast = [one(10.0) for _ in range(n - slow - failed)]
    late = [one(slow_ms) for _ in range(slow)]
    lost = [one(None, ok=False) for _ in range(failed)]
    return fast + late + lost


def test_a_p99_objective_is_certain_only_past_the_sample_size_rule() -> None:
    objective = capacity.objectives(_config().slo)[0]
    assert objective.name == "TTFT p99 ≤ 100 ms" and objective.allowed == pytest.approx(0.01)
    short = capacity.judge(objective, [_requests(367, 0)], False, 0.95)
    enough = capacity.judge(objective, [_requests(368, 0)], False, 0.95)
    assert (short.verdict, enough.verdict) == ("uncertain", "meets")
    assert short.point_meets and short.share == 0.0


def test_many_slow_requests_certainly_miss_and_failures_count_as_slow() -> None:
    objective = capacity.objectives(_config().slo)[0]
    slow = capacity.judge(objective, [_requests(32, 5)], False, 0.95)
    assert slow.verdict == "misses" and slow.misses == 5 and slow.share_low > 0.01
    failed = capacity.judge(objective, [_requests(32, 0, failed=5)], False, 0.95)
    assert failed.verdict == "misses" and failed.misses == 5
    # The reported percentile is of the successful requests, as every other output's.
    assert failed.value == pytest.approx(10.0)


def test_rounds_that_disagree_widen_the_interval() -> None:
    agree = capacity.miss_interval([5, 5, 5, 5], [100] * 4, 0.95)
    disagree = capacity.miss_interval([0, 10, 0, 10], [100] * 4, 0.95)
    assert disagree[0] < agree[0] and disagree[1] > agree[1]
    # No dispersion to speak of: the same as one pooled round.
    assert agree == pytest.approx(capacity.miss_interval([20], [400], 0.95))


def test_a_success_objective_allows_its_share_of_failures() -> None:
    cfg = compose("scenario=capacity", "slo.success=0.9")
    [objective] = capacity.objectives(cfg.slo)
    assert objective.name == "success ≥ 90.0%"
    judged = capacity.judge(objective, [_requests(100, 50, failed=2)], False, 0.95)
    assert judged.verdict == "meets" and judged.value == pytest.approx(0.98)
    judged = capacity.judge(objective, [_requests(100, 0, failed=30)], False, 0.95)
    assert judged.verdict == "misses"


def test_open_loop_latency_counts_from_the_scheduled_send() -> None:
    objective = capacity.objectives(_config().slo)[0]
    late = [request_record(ttft_ms=10.0, ttft_from_scheduled_ms=400.0) for _ in range(40)]
    assert capacity.judge(objective, [late], True, 0.95).verdict == "misses"
    assert capacity.judge(objective, [late], False, 0.95).verdict == "uncertain"


def _simulate(
    search: capacity.Search, slow_share: Callable[[float], float], seed: int = 0
) -> list[float]:
    """Run a search against a server whose share of slow requests at each load is known."""
    rng = np.random.default_rng(seed)
    loads = []
    while (load := search.next_load()) is not None:
        loads.append(load)
        assert len(loads) < 500, "the search does not end"
        n = search.round_size(load)
        slow = int(rng.binomial(n, slow_share(load)))
        search.add_round(load, _requests(n, slow), run_record())
    return loads


def test_the_search_finds_a_step_capacity_exactly() -> None:
    cfg = _config()
    search = capacity.search_for(cfg)
    loads = _simulate(search, lambda load: 0.0 if load <= 13 else 0.3)
    # Grow 1, 2, 4, 8, 16; bisect 12, 14, 13; then settle 13 to certainty.
    assert loads[:8] == [1, 2, 4, 8, 16, 12, 14, 13]
    answer = search.result(complete=True)
    assert (answer.capacity, answer.low, answer.high) == (13, 13, 13)
    assert answer.text() == (
        "Capacity at TTFT p99 ≤ 100 ms: 13 users (exact: 14 users certainly misses)"
    )
    settled = next(p for p in answer.probes if p["load"] == 13)
    assert settled["verdict"] == "meets" and int(settled["requests"]) >= 368  # type: ignore[call-overload]


def test_a_boundary_too_close_to_call_gives_an_interval() -> None:
    cfg = _config()
    search = capacity.search_for(cfg)
    # 1% slow at 10 users: neither certainly within the 1% p99 allows nor certainly above it.
    share = {10: 0.01, 11: 0.012}

    def slow_share(load: float) -> float:
        return 0.0 if load < 10 else share.get(int(load), 0.3)

    _simulate(search, slow_share, seed=3)
    answer = search.result(complete=True)
    assert answer.low is not None and answer.high is not None and answer.capacity is not None
    assert answer.low <= answer.capacity <= answer.high
    assert answer.low < answer.high, answer  # the uncertain loads are inside
    assert answer.high <= 11 and answer.low >= 8


def test_a_rate_search_bisects_to_its_precision() -> None:
    cfg = _config("scenario.search=rate", "scenario.request_rate=1", "scenario.concurrency=1")
    search = capacity.search_for(cfg)
    _simulate(search, lambda rate: 0.0 if rate <= 5.3 else 0.5)
    answer = search.result(complete=True)
    assert answer.capacity is not None and answer.high is not None
    assert answer.capacity <= 5.3 < answer.high
    assert answer.high / answer.capacity <= 1.05 + 1e-9
    assert "req/s" in answer.text()


def test_a_load_that_never_misses_is_reported_as_a_floor() -> None:
    search = capacity.search_for(_config("capacity.max_load=100"))
    loads = _simulate(search, lambda load: 0.0)
    assert sorted(set(loads)) == [1, 2, 4, 8, 16, 32, 64, 100]
    answer = search.result(complete=True)
    assert answer.capacity == 100 and answer.high is None
    assert "at least 100 users, the highest load tried" in answer.text()


def test_a_first_load_that_misses_means_no_capacity() -> None:
    search = capacity.search_for(_config())
    _simulate(search, lambda load: 1.0)
    answer = search.result(complete=True)
    assert answer.capacity is None
    assert "none: the lowest load tried (1 user) misses" in answer.text()


def test_a_search_needs_an_objective_and_one_starting_load() -> None:
    with pytest.raises(ConfigError, match="needs an objective"):
        compose("scenario=capacity")
    with pytest.raises(ConfigError, match=r"scenario\.concurrency"):
        compose("scenario=capacity", "slo.ttft_ms=1", "scenario.concurrency=[1,2]")
    with pytest.raises(ConfigError, match=r"scenario\.request_rate"):
        compose("scenario=capacity", "slo.ttft_ms=1", "scenario.search=rate")
    with pytest.raises(ConfigError, match=r"scenario\.search: expected one of concurrency, rate"):
        compose("scenario=capacity", "slo.ttft_ms=1", "scenario.search=users")
    with pytest.raises(ConfigError, match=r"slo\.success"):
        compose("scenario=capacity", "slo.success=1.5")


def test_the_reference_server_queues_beyond_its_slots(
    refserver: Callable[..., object],
) -> None:
    server = refserver("--slots", "1", "--ttft-ms", "5", "--itl-ms", "50")
    url = server.url  # type: ignore[attr-defined]
    body = json.dumps(
        {"model": "refserver", "prompt": [1, 2], "max_tokens": 4, "stream": False}
    ).encode()

    def post() -> dict[str, object]:
        req = urllib.request.Request(
            f"{url}/v1/completions", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    with ThreadPoolExecutor(2) as pool:
        first, second = (f.result() for f in [pool.submit(post), pool.submit(post)])
    queued = sorted(
        r["usage"]["timings"]["queue_ms"]  # type: ignore[index]
        for r in (first, second)
    )
    # One waits for the other's whole schedule: 5 ms + 3 x 50 ms.
    assert queued[0] < 50 and queued[1] > 140
    with urllib.request.urlopen(f"{url}/metrics") as resp:
        text = resp.read().decode()
    assert 'vllm:num_requests_running{model_name="refserver"} 0.0' in text
    assert 'vllm:num_requests_waiting{model_name="refserver"} 0.0' in text


@pytest.mark.slow
def test_the_search_finds_the_reference_servers_slot_limit_exactly(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable, "-m", "bench", "scenario=capacity", "target=refserver",
            "+target.server_args.slots=3", "target.server_args.ttft-ms=10",
            "target.server_args.itl-ms=2", "scenario.output_tokens=32", "slo.ttft_ms=30",
            f"results_dir={tmp_path}", "progress=false",
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "Capacity at TTFT p99 ≤ 30 ms: 3 users (exact: 4 users certainly misses)" in out.stdout
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    saved = json.loads((run_dir / "capacity.json").read_text())
    assert (saved["capacity"], saved["low"], saved["high"]) == (3, 3, 3)
    assert saved["complete"] is True and saved["dimension"] == "concurrency"
    loads = [p["load"] for p in saved["probes"]]
    assert loads == sorted(loads) and {3, 4} <= set(loads)
    three = next(p for p in saved["probes"] if p["load"] == 3)
    assert three["verdict"] == "meets" and three["requests"] >= 368
    assert three["goodput"] is not None and three["tokens_per_user"] > 0


def _build_with_capacities(
    tmp_path: Path, label: str, answers: list[tuple[float, float, float]]
) -> Loaded:
    """A build whose sessions each searched capacity: only their capacity.json matters here."""
    dirs = []
    for i, (cap, low, high) in enumerate(answers):
        run_dir = tmp_path / label / str(i)
        run_dir.mkdir(parents=True)
        (run_dir / "capacity.json").write_text(
            json.dumps(
                {"capacity": cap, "low": low, "high": high, "unit": "users",
                 "objectives": ["TTFT p99 ≤ 2000 ms"]}
            )
        )  # fmt: skip
        dirs.append(str(run_dir))
    return Loaded(dataclasses.replace(side(label), run_dirs=dirs), pd.DataFrame(), pd.DataFrame())


@pytest.mark.parametrize(
    ("candidate", "verdict", "words"),
    [
        ([(16, 15, 17)], "better", "higher: every candidate interval lies above"),
        ([(8, 7, 9)], "worse", "lower: every candidate interval lies below"),
        ([(13, 11, 14)], "~", "no change shown: the intervals overlap"),
    ],
)
def test_compare_sets_the_capacities_side_by_side(
    tmp_path: Path, candidate: list[tuple[float, float, float]], verdict: str, words: str
) -> None:
    base = _build_with_capacities(tmp_path, "baseline", [(12, 12, 12), (13, 12, 13)])
    cand = _build_with_capacities(tmp_path, "candidate", candidate)
    pair = _capacity(base, cand, [])
    assert pair is not None and pair.verdict == verdict
    line = capacity_line(pair)
    assert line.startswith(
        "capacity (users) at TTFT p99 ≤ 2000 ms: baseline 12 [12-12], 13 [12-13]"
    )
    assert words in line


@pytest.mark.slow
def test_compare_sets_two_searches_side_by_side_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench.compare import main as compare_main

    for slots in (2, 5):  # searches 1, 2, 4, 3 and 1, 2, 4, 8, 6, 5: loads apart
        out = subprocess.run(
            [
                sys.executable, "-m", "bench", "scenario=capacity", "target=refserver",
                f"+target.server_args.slots={slots}", "target.server_args.ttft-ms=10",
                "target.server_args.itl-ms=2", "scenario.output_tokens=32", "slo.ttft_ms=30",
                f"results_dir={tmp_path / str(slots)}", "progress=false",
            ],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
    code = compare_main([f"baseline={tmp_path / '2'}", f"candidate={tmp_path / '5'}"])
    printed = capsys.readouterr()
    assert code == 0
    assert (
        "capacity (users) at TTFT p99 ≤ 30 ms: baseline 2 [2-2], candidate 5 [5-5]: higher"
        in printed.out
    )
    # Probes at loads one search tried and the other did not are one warning, not one each.
    assert "only in the" not in printed.err
    assert "capacity probes at loads only one build measured" in printed.err
    assert compare_main([f"baseline={tmp_path / '5'}", f"candidate={tmp_path / '2'}"]) == 1
