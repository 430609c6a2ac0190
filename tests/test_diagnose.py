"""bench.diagnose: each rule fires on the measurements that define it, and only on those."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import diagnose as dg
from bench import diagnosis as rules
from bench import figures, report, store
from bench.diagnosis import Diagnosis, Finding, Thresholds, diagnose
from bench.records import (
    REQUESTS_SCHEMA,
    RUNS_SCHEMA,
    SCHEMA_VERSION,
    TELEMETRY_SCHEMA,
    RequestRecord,
    RunRecord,
    TelemetryRecord,
    to_table,
)
from bench.store import RunStore, StoredRun
from bench.telemetry import SERVER_METRICS
from tests.synthetic import request_record, run_record

# One level, closed loop at 8 users, whose window is [1, 11] s; scrapes every 0.5 s inside it.
START, END, SCRAPES = 1.0, 11.0, 20
SMALL_BATCH = "runtime:\n  max_num_seqs: 2\n"


def _run(**fields: Any) -> RunRecord:
    return run_record(**({"concurrency": 8} | fields))


def _busy(n: int = 8, repeat: int = 0, **fields: Any) -> list[RequestRecord]:
    """n requests in flight from START to END: the server never idles."""
    times = {"scheduled_s": START, "sent_s": START, "first_token_s": START + 0.1, "end_s": END}
    return [
        request_record(index=i, repeat=repeat, concurrency=8, **(times | fields)) for i in range(n)
    ]


def _sparse() -> list[RequestRecord]:
    """Five requests of 0.2 s spread over [START, END]: in flight 10% of the time."""
    sends = [START + 2.45 * k for k in range(5)]
    return [
        request_record(index=k, concurrency=1, scheduled_s=s, sent_s=s, end_s=s + 0.2)
        for k, s in enumerate(sends)
    ]


def _samples(
    metric: str,
    values: Sequence[float] | float,
    source: str = "server",
    start: float = START + 0.25,
) -> list[TelemetryRecord]:
    """A sample every 0.5 s from `start`; a single value is repeated SCRAPES times."""
    values = [values] * SCRAPES if isinstance(values, int | float) else values
    return [
        TelemetryRecord(SCHEMA_VERSION, "r", start + 0.5 * i, source, metric, float(v))
        for i, v in enumerate(values)
    ]


def _server(
    running: Sequence[float] | float,
    waiting: Sequence[float] | float,
    kv: Sequence[float] | float = 0.05,
) -> list[TelemetryRecord]:
    return [
        *_samples(rules.RUNNING, running),
        *_samples(rules.WAITING, waiting),
        *_samples(rules.KV_USAGE[0], kv),
        *_samples(rules.PREEMPTIONS, 0),
    ]


def _stored(
    requests: list[RequestRecord],
    runs: list[RunRecord] | None = None,
    telemetry: Sequence[TelemetryRecord] = (),
) -> StoredRun:
    """Frames as bench.store.load returns them: through Arrow."""
    return StoredRun(
        requests=to_table(requests, REQUESTS_SCHEMA).to_pandas(),
        runs=to_table(runs or [_run()], RUNS_SCHEMA).to_pandas(),
        telemetry=to_table(list(telemetry), TELEMETRY_SCHEMA).to_pandas(),
    )


def _fired(d: Diagnosis, rule: str) -> Finding | None:
    found = [f for f in d.findings if f.rule == rule]
    assert len(found) <= 1
    return found[0] if found else None


def _reason(d: Diagnosis, rule: str) -> str:
    (skipped,) = [s for s in d.not_evaluated if s.rule == rule]
    return skipped.reason


# ---- windows and what the rules need ------------------------------------------------------


def test_a_level_has_one_window_per_repeat_from_first_send_to_last_byte() -> None:
    requests = _busy(repeat=0) + [
        dataclasses.replace(r, repeat=1, scheduled_s=20.0, sent_s=20.5, end_s=25.0)
        for r in _busy(repeat=1)
    ]
    runs = [_run(repeat=0), _run(repeat=1)]
    stored = _stored(requests, runs)
    ((level, windows),) = rules.level_windows(stored.runs, stored.requests).items()
    assert level.label == "64/128 c=8"
    assert [(w.repeat, w.start_s, w.end_s) for w in windows] == [(0, 1.0, 11.0), (1, 20.0, 25.0)]


def test_a_finding_names_its_level_as_the_other_outputs_do_and_lists_its_windows() -> None:
    d = diagnose(_stored(_busy(), [_run(client_bound=True)]))
    (finding,) = d.findings
    assert finding.level == "64/128 c=8" and finding.windows == [[1.0, 11.0]]


def test_a_server_without_metrics_leaves_its_rules_unevaluated_with_the_reason() -> None:
    d = diagnose(_stored(_busy()))
    assert _reason(d, "under_fed") == "the server publishes no vllm:num_requests_waiting"
    assert _reason(d, "batch_cap") == "the server publishes no vllm:num_requests_running"
    assert "publishes no vllm:kv_cache_usage_perc" in _reason(d, "kv_pressure")
    assert d.evaluated == {"64/128 c=8": ["client_bound"]} and not d.findings


def test_too_few_scrapes_in_the_window_leave_a_rule_unevaluated() -> None:
    telemetry = _samples(rules.WAITING, [0, 0]) + _samples(rules.WAITING, [0, 0], start=30.0)
    d = diagnose(_stored(_sparse(), [_run(concurrency=1)], telemetry))
    assert _reason(d, "under_fed") == (
        "2 scrapes of vllm:num_requests_waiting in the level's windows; the rule needs 3"
    )


def test_the_metric_names_are_those_the_harness_scrapes() -> None:
    assert {rules.RUNNING, rules.WAITING, *rules.KV_USAGE, rules.PREEMPTIONS} == set(SERVER_METRICS)


def test_the_default_batch_ceiling_is_the_bundled_engines_default() -> None:
    from runtime.config import EngineConfig

    assert Thresholds().default_max_num_seqs == EngineConfig(model="tiny").max_num_seqs


def test_thresholds_refuse_a_share_outside_zero_to_one() -> None:
    with pytest.raises(ValueError, match=r"thresholds\.burst_share: expected a share in"):
        Thresholds(burst_share=1.5)


# ---- under_fed ---------------------------------------------------------------------------


def test_under_fed_fires_when_nothing_waits_and_the_server_mostly_idles() -> None:
    running = [1.0] + [0.0] * (SCRAPES - 1)
    d = diagnose(_stored(_sparse(), [_run(concurrency=1)], _server(running, 0)))
    finding = _fired(d, "under_fed")
    assert finding is not None
    assert finding.evidence == {
        "waiting_share": 0.0,
        "scrapes": 20,
        "idle_share": 0.9,
        "running_mean": 0.05,
        "max_num_seqs": 256,
    }
    assert "idle (no request in flight) 90% of the time" in finding.detail
    assert finding.knobs[0].startswith("scenario.concurrency: raise it")


def test_under_fed_fires_on_a_gpu_that_idles_while_nothing_waits() -> None:
    telemetry = _server(8, 0) + _samples("gpu_util_pct", 30.0, source="gpu0")
    finding = _fired(diagnose(_stored(_busy(), telemetry=telemetry)), "under_fed")
    assert finding is not None and finding.evidence["gpu_util_pct_mean"] == 30.0


def test_an_open_loop_level_is_told_to_raise_its_rate_and_its_cap() -> None:
    sparse = [dataclasses.replace(r, request_rate=0.5) for r in _sparse()]
    runs = [_run(concurrency=1, request_rate=0.5)]
    finding = _fired(diagnose(_stored(sparse, runs, _server(0, 0))), "under_fed")
    assert finding is not None and finding.level == "64/128 0.5/s ≤1"
    assert [k.split(":")[0] for k in finding.knobs] == [
        "scenario.request_rate",
        "scenario.max_concurrency",
    ]


def test_a_healthy_saturated_server_is_neither_under_fed_nor_batch_capped() -> None:
    running = [200, 230, 256, 240] * 5  # near its ceiling, at it in a quarter of the scrapes
    waiting = [0, 0, 3, 0, 0] * 4  # a queue now and then
    telemetry = _server(running, waiting) + _samples("gpu_util_pct", 95.0, source="gpu0")
    d = diagnose(_stored(_busy(), telemetry=telemetry))
    assert {"under_fed", "batch_cap", "kv_pressure"} <= set(d.evaluated["64/128 c=8"])
    assert not d.findings


def test_another_servers_batch_limit_is_not_assumed() -> None:
    """8 of the bundled engine's 256 is under-fed; 8 on a server of unknown limit, never idle
    (the reference server with 8 slots, say), is not."""
    bundled = diagnose(_stored(_busy(), telemetry=_server(8, 0)))
    assert _fired(bundled, "under_fed") is not None
    other = diagnose(_stored(_busy(), [_run(target_kind="openai")], _server(8, 0)))
    assert _fired(other, "under_fed") is None


def test_a_busy_gpu_is_not_under_fed_even_when_nothing_waits() -> None:
    telemetry = _server(8, 0) + _samples("gpu_util_pct", 90.0, source="gpu0")
    assert _fired(diagnose(_stored(_busy(), telemetry=telemetry)), "under_fed") is None


# ---- batch_cap ---------------------------------------------------------------------------


def test_batch_cap_fires_when_running_sits_at_max_num_seqs_while_requests_wait() -> None:
    runs = [_run(config_yaml=SMALL_BATCH)]
    finding = _fired(diagnose(_stored(_busy(), runs, _server(2, 5, kv=0.05))), "batch_cap")
    assert finding is not None
    assert finding.evidence == {
        "ceiling": 2,
        "pinned_share": 1.0,
        "waiting_share": 1.0,
        "waiting_mean": 5.0,
        "max_num_seqs": 2,
        "kv_usage_max": 0.05,
    }
    assert "(= --max-num-seqs 2)" in finding.detail
    knobs = [k.split(":")[0] for k in finding.knobs]
    assert knobs == ["--max-num-seqs", "--max-num-batched-tokens"]


def test_a_full_kv_cache_is_kv_pressure_not_a_batch_cap() -> None:
    d = diagnose(_stored(_busy(), telemetry=_server(2, 5, kv=0.95)))
    assert _fired(d, "batch_cap") is None and _fired(d, "kv_pressure") is not None


# ---- kv_pressure -------------------------------------------------------------------------


def test_kv_pressure_fires_when_the_cache_is_full_in_a_quarter_of_the_scrapes() -> None:
    kv = [0.95] * 10 + [0.5] * 10
    finding = _fired(diagnose(_stored(_busy(), telemetry=_server(4, 0, kv=kv))), "kv_pressure")
    assert finding is not None
    assert finding.evidence == {"kv_full_share": 0.5, "kv_usage_max": 0.95, "preemptions": 0}
    assert "--num-gpu-blocks-override" in finding.knobs[1]


def test_kv_pressure_counts_the_preemptions_inside_the_window_only() -> None:
    # 5 preemptions before the level (warm-up), 3 during it, 4 after it.
    counter = [5.0, 5.0, 5.0, 6.0, 8.0, 8.0] + [8.0] * 16 + [12.0]
    telemetry = [
        *_samples(rules.RUNNING, 4),
        *_samples(rules.WAITING, 0),
        *_samples(rules.KV_USAGE[0], 0.5),
        *_samples(rules.PREEMPTIONS, counter, start=0.25),  # 0.25 .. 11.25 s
    ]
    finding = _fired(diagnose(_stored(_busy(), telemetry=telemetry)), "kv_pressure")
    assert finding is not None and finding.evidence["preemptions"] == 3
    assert finding.title == "KV cache pressure: the cache ran full, with preemptions"


def test_kv_pressure_reads_vllms_older_gauge_name() -> None:
    telemetry = [*_samples(rules.RUNNING, 4), *_samples(rules.WAITING, 0)]
    telemetry += _samples("vllm:gpu_cache_usage_perc", 0.99)
    assert _fired(diagnose(_stored(_busy(), telemetry=telemetry)), "kv_pressure") is not None


def test_a_roomy_kv_cache_without_preemptions_is_no_pressure() -> None:
    d = diagnose(_stored(_busy(), telemetry=_server(4, 0, kv=0.6)))
    assert "kv_pressure" in d.evaluated["64/128 c=8"] and _fired(d, "kv_pressure") is None


def test_a_threshold_passed_in_decides() -> None:
    kv = [0.95] * 10 + [0.5] * 10
    stored = _stored(_busy(), telemetry=_server(4, 0, kv=kv))
    assert _fired(diagnose(stored, Thresholds(kv_full_share=0.6)), "kv_pressure") is None


# ---- queue_dominated_ttft ----------------------------------------------------------------


def _timed(queue: Sequence[float], prefill: float = 10.0) -> list[RequestRecord]:
    return [
        dataclasses.replace(r, server_queue_ms=q, server_prefill_ms=prefill, server_decode_ms=40.0)
        for r, q in zip(_busy(len(queue)), queue, strict=True)
    ]


def test_queue_dominated_ttft_fires_when_most_requests_wait_longer_than_they_prefill() -> None:
    finding = _fired(diagnose(_stored(_timed([100.0] * 6 + [1.0] * 2))), "queue_dominated_ttft")
    assert finding is not None
    assert finding.evidence == {
        "queue_longer_share": 0.75,
        "queue_ms_p50": 100.0,
        "prefill_ms_p50": 10.0,
    }
    assert finding.knobs[0].startswith("scenario.concurrency: lower it")
    assert finding.knobs[-1].startswith("--tensor-parallel-size")


def test_requests_that_compute_longer_than_they_wait_are_not_queue_dominated() -> None:
    d = diagnose(_stored(_timed([1.0] * 8)))
    assert "queue_dominated_ttft" in d.evaluated["64/128 c=8"]
    assert _fired(d, "queue_dominated_ttft") is None


def test_queue_dominated_ttft_needs_the_servers_timings() -> None:
    reason = _reason(diagnose(_stored(_busy())), "queue_dominated_ttft")
    assert reason == "the server reports no queue and prefill times (usage.timings)"


# ---- client_bound ------------------------------------------------------------------------


def test_client_bound_fires_on_a_repeat_whose_event_loop_lagged() -> None:
    runs = [
        _run(repeat=0, client_bound=True, loop_lag_ms_p99=3.5, send_lag_ms_p99=0.4),
        _run(repeat=1),
    ]
    requests = _busy() + _busy(repeat=1)
    finding = _fired(diagnose(_stored(requests, runs)), "client_bound")
    assert finding is not None
    assert finding.evidence == {
        "repeats": 1,
        "of_repeats": 2,
        "loop_lag_ms_p99": 3.5,
        "send_lag_ms_p99": 0.4,
    }
    assert finding.detail.startswith("1 of 2 repeats were client-bound")


def test_a_client_that_kept_up_is_not_client_bound() -> None:
    assert _fired(diagnose(_stored(_busy(), [_run(loop_lag_ms_p99=0.2)])), "client_bound") is None


# ---- tp_imbalance ------------------------------------------------------------------------


def test_tp_imbalance_fires_when_one_gpu_holds_a_third_more_than_the_other() -> None:
    runs = [_run(peak_gpu_memory_mib=[20000.0, 15000.0], peak_gpu_memory_mib_total=35000.0)]
    finding = _fired(diagnose(_stored(_busy(), runs)), "tp_imbalance")
    assert finding is not None
    assert finding.evidence == {
        "max_over_min": 1.333,
        "gpu0_peak_mib": 20000.0,
        "gpu1_peak_mib": 15000.0,
    }
    assert finding.knobs[0].startswith("--tensor-parallel-size")


def test_gpus_within_ten_percent_are_balanced() -> None:
    runs = [_run(peak_gpu_memory_mib=[20000.0, 19500.0], peak_gpu_memory_mib_total=39500.0)]
    assert _fired(diagnose(_stored(_busy(), runs)), "tp_imbalance") is None


def test_tp_imbalance_needs_two_gpus() -> None:
    reason = _reason(diagnose(_stored(_busy())), "tp_imbalance")
    assert reason == "fewer than 2 GPUs measured (NVML)"


# ---- bursty_delivery ---------------------------------------------------------------------


def _streamed(event_ms: list[float], event_tokens: list[int]) -> list[RequestRecord]:
    tokens = sum(event_tokens)
    fields: dict[str, Any] = {"output_tokens": tokens, "event_ms": event_ms}
    fields["event_tokens"] = event_tokens
    fields |= {"server_decode_ms": 75.0, "events": len(event_ms)}  # a 5 ms step
    return [dataclasses.replace(r, **fields) for r in _busy()]


def test_bursty_delivery_fires_when_tokens_come_four_at_a_time_every_four_steps() -> None:
    requests = _streamed([10.0, 30.0, 50.0, 70.0], [4, 4, 4, 4])
    finding = _fired(diagnose(_stored(requests)), "bursty_delivery")
    assert finding is not None
    # Per request 15 gaps: 12 of them 0 ms (inside an event), 3 of 20 ms.
    assert finding.evidence == {
        "burst_share": 0.8,
        "tokens_per_burst_p50": 4.0,
        "burst_gap_ms_p50": 20.0,
        "step_ms_p50": 5.0,
    }


def test_a_token_per_step_is_not_bursty() -> None:
    requests = _streamed([10.0 + 5.0 * i for i in range(16)], [1] * 16)
    d = diagnose(_stored(requests))
    assert "bursty_delivery" in d.evaluated["64/128 c=8"]
    assert _fired(d, "bursty_delivery") is None


def test_bursty_delivery_needs_requests_of_eight_tokens() -> None:
    reason = _reason(diagnose(_stored(_busy())), "bursty_delivery")  # 4 tokens each
    assert reason.startswith("0 successful requests of 8 or more tokens")


# ---- outputs -----------------------------------------------------------------------------


def _run_dir(root: Path) -> Path:
    """A run on disk whose only level is batch-capped."""
    s = RunStore(root, "r")
    s.runs, s.requests = [_run(config_yaml=SMALL_BATCH)], _busy()
    s.telemetry = _server(2, 5)
    s.flush()
    return s.dir


def test_diagnosis_json_reads_back_as_the_diagnosis_written(tmp_path: Path) -> None:
    path = dg.write_diagnosis(_run_dir(tmp_path))
    assert path == tmp_path / "r" / "diagnosis.json"
    back = dg.read_diagnosis(path)
    assert back == diagnose(store.load(tmp_path / "r"))
    data = json.loads(path.read_text())
    assert set(data) == {"run_ids", "findings", "evaluated", "not_evaluated", "thresholds"}
    assert data["thresholds"]["kv_full"] == 0.9
    assert [f["rule"] for f in data["findings"]] == ["batch_cap"]


def test_the_cli_prints_each_finding_and_writes_its_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _run_dir(tmp_path)
    assert dg.main([f"run={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "[batch_cap] Batch capped at 2 running requests while others wait" in out
    assert "  level     64/128 c=8" in out and "  windows   1.00–11.00 s" in out
    assert "  knobs     --max-num-seqs: raise it" in out
    assert "tp_imbalance (every level): fewer than 2 GPUs measured (NVML)" in out
    assert (run_dir / "diagnosis.json").is_file() and (run_dir / "timeline.png").is_file()


def test_the_cli_says_no_findings_with_the_rules_it_evaluated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = RunStore(tmp_path, "r")
    s.runs, s.requests = [_run()], _busy()
    s.flush()
    assert dg.main([f"run={s.dir}"]) == 0
    out = capsys.readouterr().out
    assert "no findings (rules evaluated: client_bound)" in out


def test_the_cli_refuses_a_missing_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert dg.main([f"run={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: run directory {tmp_path / 'nope'} does not exist\n"


def test_the_cli_refuses_an_unknown_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert dg.main(["run=x", "colour=red"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_the_cli_help_shows_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert dg.main(["--help"]) == 0
    assert "python -m bench.diagnose run=PATH" in capsys.readouterr().out


def test_the_run_report_has_a_diagnosis_section_with_each_finding(tmp_path: Path) -> None:
    paths = report.write_run_report([_run_dir(tmp_path)], tmp_path / "report")
    md = paths["md"].read_text(encoding="utf-8")
    section = md.split("## Diagnosis\n", 1)[1].split("\n## ", 1)[0]
    assert "- 64/128 c=8 · batch_cap: Batch capped at 2 running requests" in section
    assert "Evidence: ceiling 2 · pinned_share 1" in section
    assert "Knobs: --max-num-seqs: raise it" in section
    assert paths["timeline"] == tmp_path / "report" / "timeline.png"
    assert "![Telemetry timeline](timeline.png)" in md


def test_a_report_without_findings_says_which_rules_it_evaluated(tmp_path: Path) -> None:
    s = RunStore(tmp_path, "r")
    s.runs, s.requests = [_run()], _busy()
    s.flush()
    md = report.write_run_report([s.dir], tmp_path / "report")["md"].read_text(encoding="utf-8")
    assert "No findings (rules evaluated: client_bound)." in md


# ---- timeline ----------------------------------------------------------------------------


def test_the_timeline_has_a_panel_per_signal_recorded_and_marks_each_preemption() -> None:
    counter = [0.0] * 5 + [1.0] * 5 + [3.0] * 10  # rises twice
    telemetry = [
        *_samples(rules.RUNNING, 2),
        *_samples(rules.WAITING, 5),
        *_samples(rules.KV_USAGE[0], 0.5),
        *_samples(rules.PREEMPTIONS, counter),
        *_samples("rss_mib", 600.0, source="process"),
        *_samples("loop_lag_ms", 0.1, source="client"),
    ]
    fig = figures._timeline_figure(_stored(_busy(), telemetry=telemetry))
    axes = [ax for ax in fig.axes if ax.get_ylabel()]
    labels = [ax.get_ylabel() for ax in axes]
    assert labels == ["server RSS (MiB)", "requests", "KV cache (%)", "loop lag (ms)"]
    markers = [line for line in axes[2].lines if line.get_label() == "preemption"]
    assert len(markers) == 1 and np.asarray(markers[0].get_xdata()).tolist() == [3.75, 6.25]


def test_the_timeline_shows_gpu_panels_where_nvml_measured() -> None:
    telemetry = [
        *_samples("gpu_util_pct", 40.0, source="gpu0"),
        *_samples("memory_used_mib", 9000.0, source="gpu0"),
    ]
    fig = figures._timeline_figure(_stored(_busy(), telemetry=telemetry))
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert labels == ["GPU util (%)", "GPU memory (MiB)"]


def test_the_timeline_labels_each_levels_window() -> None:
    requests = _busy() + [
        dataclasses.replace(r, level=1, concurrency=16, scheduled_s=12.0, sent_s=12.0, end_s=20.0)
        for r in _busy()
    ]
    runs = [_run(), _run(level=1, concurrency=16)]
    telemetry = _samples("loop_lag_ms", 0.1, source="client")
    fig = figures._timeline_figure(_stored(requests, runs, telemetry))
    (top,) = fig.axes[0].child_axes  # the level labels along the top of the first panel
    assert [t.get_text() for t in top.get_xticklabels()] == ["64/128 c=8", "64/128 c=16"]
