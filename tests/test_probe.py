"""The machine speed probe: its figures, how runs store it, and what a comparison does with it.

A comparison gives no verdict on a change within the machine's own change of speed between
or during the builds' sessions; the probes here are synthetic, except in the first tests
(this machine, now) and the slow one (a real run against the reference server).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from bench import compare, probe, report, stats, store
from bench.comparison import INTERLEAVED, Comparison, Row
from bench.levels import Level
from bench.probe import Probe, Session
from bench.records import RUNS_SCHEMA, to_table
from bench.stats import Verdict
from tests.synthetic import run_record, side

# ---- the probe on this machine -----------------------------------------------------------


@pytest.fixture(scope="module")
def here() -> Probe:
    return probe.measure(gpu=False)


def test_a_probe_has_a_positive_value_and_a_unit_for_every_cpu_and_client_figure(
    here: Probe,
) -> None:
    for figure in probe.FIGURES:
        assert figure.unit
        if figure.part != "GPU":
            value = here.value(figure)
            assert value is not None and value > 0, figure.label


def test_a_probe_round_trips_through_json(here: Probe) -> None:
    assert Probe.from_json(here.to_json()) == here


def test_a_probe_takes_under_ten_seconds(here: Probe) -> None:
    # The probe runs twice a session; ~0.6 s on a 2-vCPU VM (docs/perf.md). Loose on purpose.
    assert 0 < here.wall_s < 10.0


def test_a_probe_skips_the_gpu_part_where_nvml_reports_no_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(probe, "gpu_available", lambda: False)
    assert probe.gpu_figures() == {}


def test_a_probe_from_a_newer_harness_reads_back_without_the_keys_it_added() -> None:
    text = _probe(50.0).to_json().replace('{"cpu_copy_gbs"', '{"cpu_fp8_tops": 1.0, "cpu_copy_gbs"')
    assert Probe.from_json(text) == _probe(50.0)


def test_a_change_of_speed_is_a_fraction_of_the_slower_either_way() -> None:
    assert probe.change(100.0, 150.0) == pytest.approx(0.5)
    assert probe.change(150.0, 100.0) == pytest.approx(0.5)


# ---- stored with the runs ----------------------------------------------------------------


def test_runs_of_schema_3_load_with_null_probes(tmp_path: Path) -> None:
    s = store.RunStore(tmp_path, "old")
    s.runs = [run_record(run_id="old")]
    s.flush()
    for name in ("requests", "runs", "telemetry"):
        path = s.dir / f"{name}.parquet"
        table = pq.read_table(path)
        if name == "runs":
            table = table.drop(["probe_before_json", "probe_after_json"])
        pq.write_table(table.replace_schema_metadata({b"bench.schema_version": b"3"}), path)
    runs = store.load(s.dir).runs
    assert runs["probe_before_json"].isna().all() and runs["probe_after_json"].isna().all()
    assert probe.sessions_of(runs) == [Session(None, None)]


@pytest.mark.slow
def test_a_run_stores_a_probe_from_before_the_server_started_and_after_it_stopped(
    tmp_path: Path,
) -> None:
    from bench.compose import compose
    from bench.runner import run

    result = run(compose(
        "scenario=short_qa", "target=refserver", "scenario.num_requests=2",
        "scenario.repeats=1", "scenario.output_tokens=4", f"results_dir={tmp_path}",
        "progress=false",
    ))  # fmt: skip
    runs = store.load(result.run_dir).runs
    (session,) = probe.sessions_of(runs)
    assert session.before is not None and session.after is not None
    assert session.before.cpu_matmul_gflops > 0 and session.after.loop_wakeup_us > 0
    started = pd.Timestamp(runs["started_at"].min()).floor("s")
    ended = pd.Timestamp(runs["ended_at"].max()).floor("s")
    assert pd.Timestamp(session.before.taken_at) <= started
    assert pd.Timestamp(session.after.taken_at) >= ended


# ---- the comparison's post-pass ----------------------------------------------------------

LEVEL = Level("sweep", 64, 128, concurrency=1, request_rate=None)


def _probe(
    matmul: float, copy: float | None = None, loop_us: float = 5.0, gpu: float | None = None
) -> Probe:
    """A probe whose CPU copy moves with its matmul (copy = matmul / 2.5) unless given, as on
    a machine whose speed changed; likewise the GPU copy with the GEMM."""
    return Probe(
        taken_at="2026-01-01T00:00:00+00:00",
        wall_s=0.6,
        cpu_matmul_gflops=matmul,
        cpu_copy_gbs=matmul / 2.5 if copy is None else copy,
        loop_wakeup_us=loop_us,
        gpu_gemm_tflops=gpu,
        gpu_copy_gbs=None if gpu is None else gpu * 5,
    )


def _sessions(before: Probe | None, after: Probe | None) -> list[Session]:
    """One session's probes as a stored run carries them (every row of it, read back)."""
    rows = [
        run_record(
            repeat=r,
            probe_before_json=None if before is None else before.to_json(),
            probe_after_json=None if after is None else after.to_json(),
        )
        for r in range(3)
    ]
    return probe.sessions_of(to_table(rows, RUNS_SCHEMA).to_pandas())


def _comparison(scale: float, verdict: Verdict, regression: bool = False) -> Comparison:
    """One throughput row whose candidate is `scale` times the baseline, with 1% noise."""
    base = [100.0, 101.0, 99.0, 100.5, 99.5]
    cand = [v * scale for v in (100.2, 100.8, 99.4, 100.1, 99.6)]
    test = stats.ratio_test(base, cand)
    metric = compare.METRICS[0] if verdict != "worse" else compare.METRICS[3]
    row = Row(
        level=LEVEL,
        metric=metric,
        baseline=base,
        candidate=cand,
        baseline_geomean=stats.geomean(base),
        candidate_geomean=stats.geomean(cand),
        test=test,
        p_adjusted=test.p_welch,
        verdict=verdict,
        gate=0.05,
        regression=regression,
    )
    return Comparison("stored baseline", side("baseline"), side("candidate"), 0.05, 0.05,
                      rows=[row])  # fmt: skip


def _faster_candidate_machine() -> tuple[list[Session], list[Session]]:
    """The candidate's machine did the probe's matmul 1.5x as fast: a 50% drift."""
    return _sessions(_probe(50.0), _probe(50.0)), _sessions(_probe(75.0), _probe(75.0))


def test_a_better_row_within_a_50_percent_drift_becomes_unchanged_with_a_note() -> None:
    result = _comparison(1.3, "better")
    compare._within_machine_drift(result, *_faster_candidate_machine())
    (row,) = result.rows
    assert row.verdict == "~"
    moved = "changed by 50.0% (CPU matmul and CPU copy between the builds)"
    assert row.note is not None and moved in row.note
    assert result.counts() == {"better": 0, "worse": 0, "~": 1}
    assert any("1 significant change (0 worse) got no verdict" in w for w in result.warnings)


def test_a_better_row_beyond_the_drift_keeps_its_verdict() -> None:
    result = _comparison(1.8, "better")
    compare._within_machine_drift(result, *_faster_candidate_machine())
    (row,) = result.rows
    assert row.verdict == "better" and row.note is None
    assert result.machine is not None and result.machine.drift == pytest.approx(0.5)


def test_interleaved_builds_keep_their_verdicts_and_show_the_probes() -> None:
    result = dataclasses.replace(_comparison(1.3, "better"), mode=INTERLEAVED)
    compare._within_machine_drift(result, *_faster_candidate_machine())
    assert result.rows[0].verdict == "better" and result.rows[0].note is None
    assert result.machine is not None and result.machine.drift == pytest.approx(0.5)
    assert report.drift_rule(result) == ""  # no drift rule to explain


def test_a_regression_within_the_drift_no_longer_fails_the_comparison() -> None:
    result = _comparison(1.2, "worse", regression=True)
    compare._within_machine_drift(result, *_faster_candidate_machine())
    assert result.regressions == [] and result.rows[0].verdict == "~"
    assert any("(1 worse)" in w for w in result.warnings)


def test_a_change_of_speed_during_one_session_counts_as_drift() -> None:
    steady = _sessions(_probe(50.0), _probe(50.0))
    slowing = _sessions(_probe(50.0), _probe(40.0))  # 25% slower by the end
    result = _comparison(1.2, "better")
    compare._within_machine_drift(result, steady, slowing)
    m = result.machine
    assert m is not None and m.within == (0.0, pytest.approx(0.25))
    assert m.cause == "CPU matmul and CPU copy during the candidate's sessions"
    assert result.rows[0].verdict == "~"


def test_one_cpu_figure_moving_alone_is_a_disturbance_not_drift() -> None:
    steady = _sessions(_probe(50.0), _probe(50.0))
    hiccup = _sessions(_probe(50.0, copy=20.0), _probe(40.0, copy=20.0))  # matmul alone moved
    result = _comparison(1.2, "better")
    compare._within_machine_drift(result, steady, hiccup)
    assert result.machine is not None and result.machine.drift == pytest.approx(0.0)
    assert result.rows[0].verdict == "better"


def test_the_client_loop_gates_too() -> None:
    base = _sessions(_probe(50.0, loop_us=5.0), _probe(50.0, loop_us=5.0))
    cand = _sessions(_probe(50.0, loop_us=7.5), _probe(50.0, loop_us=7.5))
    result = _comparison(1.3, "better")
    compare._within_machine_drift(result, base, cand)
    assert result.machine is not None and result.machine.cause.startswith("loop wake-up")
    assert result.rows[0].verdict == "~"


def test_with_gpus_on_both_sides_the_gpu_figures_gate_and_the_cpu_ones_are_shown_only() -> None:
    base = _sessions(_probe(50.0, gpu=600.0), _probe(50.0, gpu=600.0))
    cand = _sessions(_probe(100.0, gpu=606.0), _probe(100.0, gpu=606.0))
    result = _comparison(1.3, "better")
    compare._within_machine_drift(result, base, cand)
    m = result.machine
    assert m is not None and m.drift == pytest.approx(0.01)
    gating = {f.label for f in m.figures if f.gates}
    assert gating == {"GPU GEMM", "GPU copy", "loop wake-up"}
    assert result.rows[0].verdict == "better"


def test_builds_without_probes_keep_their_verdicts_and_the_comparison_says_so() -> None:
    result = _comparison(1.3, "better")
    compare._within_machine_drift(result, _sessions(None, None), _sessions(_probe(75.0), None))
    assert result.machine is None and result.rows[0].verdict == "better"
    assert any("no machine speed probe in the baseline" in w for w in result.warnings)


# ---- what the report and the console show -------------------------------------------------


def _drifted() -> Comparison:
    result = _comparison(1.3, "better")
    compare._within_machine_drift(result, *_faster_candidate_machine())
    return result


def test_the_report_header_shows_each_builds_probe_and_the_candidates_ratio(
    tmp_path: Path,
) -> None:
    md = report.markdown(report._comparison_blocks(_drifted(), {}, tmp_path))
    (line,) = [x for x in md.splitlines() if x.startswith("| machine speed (probe)")]
    assert "CPU matmul 50.0 GFLOP/s" in line and "CPU matmul 75.0 GFLOP/s (×1.500)" in line
    (drift,) = [x for x in md.splitlines() if x.startswith("| machine speed drift")]
    assert "±50.0% from the baseline's" in drift


def test_the_report_marks_a_row_within_the_drift_and_explains_the_mark(tmp_path: Path) -> None:
    md = report.markdown(report._comparison_blocks(_drifted(), {}, tmp_path))
    assert any(
        x.startswith("| sweep 64/128 c=1") and x.endswith("| ~\\* |") for x in md.splitlines()
    )
    assert "~\\*: significant but within it, so it cannot be told from the machine" in md


def test_the_console_shows_the_probe_ratio_and_marks_a_row_within_the_drift() -> None:
    console = Console(width=120, record=True, file=io.StringIO())
    compare._print(_drifted(), console)
    text = console.export_text()
    assert "machine speed (probe)" in text and "×1.500" in text
    words = " ".join(text.split())
    assert "~*" in text and "±50.0% (CPU matmul and CPU copy between the builds" in words


def test_a_row_without_a_note_is_shown_without_the_mark() -> None:
    row = _comparison(1.3, "better").rows[0]
    assert report._verdict(row) == "better ✅"
    assert report._verdict(dataclasses.replace(row, verdict="~", note="moved")) == "~*"
