"""Records with the real schemas and every column set, for tests that need rows, not runs."""

from __future__ import annotations

from typing import Any

from bench.comparison import Side
from bench.records import SCHEMA_VERSION, RequestRecord, RunRecord


def request_record(**fields: Any) -> RequestRecord:
    """A successful request with every column set; `fields` override."""
    base: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": "r",
        "scenario": "sweep",
        "repeat": 0,
        "level": 0,
        "input_tokens": 64,
        "output_tokens_requested": 4,
        "concurrency": 1,
        "request_rate": None,
        "index": 0,
        "group_id": None,
        "group_position": None,
        "ramp_up": False,
        "request_id": "q",
        "ok": True,
        "error": None,
        "error_message": None,
        "http_status": 200,
        "prompt_tokens": 64,
        "output_tokens": 4,
        "reasoning_tokens": None,
        "output_tokens_source": "usage",
        "token_attribution": "usage",
        "events": 4,
        "scheduled_s": 0.0,
        "sent_s": 0.0,
        "first_token_s": 0.01,
        "end_s": 0.05,
        "send_lag_ms": 0.0,
        "ttft_ms": 10.0,
        "ttfo_ms": None,
        "tpot_ms": 5.0,
        "e2e_ms": 50.0,
        "ttft_from_scheduled_ms": 10.0,
        "e2e_from_scheduled_ms": 50.0,
        "itl_ms": [5.0, 5.0, 5.0],
        "event_ms": [10.0, 15.0, 20.0, 25.0],
        "event_tokens": [1, 1, 1, 1],
        "server_queue_ms": None,
        "server_prefill_ms": None,
        "server_decode_ms": None,
        "server_e2e_ms": None,
    }
    return RequestRecord(**(base | fields))


def run_record(**fields: Any) -> RunRecord:
    """A complete run (one level, one repeat) with every column set; `fields` override."""
    nulls = {f: None for f in RunRecord.__dataclass_fields__ if f.endswith(("_p90", "_mean"))}
    base: dict[str, Any] = {
        **nulls,
        "schema_version": SCHEMA_VERSION,
        "run_id": "r",
        "scenario": "sweep",
        "repeat": 0,
        "level": 0,
        "input_tokens": 64,
        "output_tokens": 128,
        "concurrency": 1,
        "request_rate": None,
        "status": "complete",
        "stopped_early": None,
        "started_at": "2026-01-01T00:00:00+00:00",
        "ended_at": "2026-01-01T00:00:01+00:00",
        "monotonic_origin_s": 0.0,
        "duration_s": 1.0,
        "num_requests": 2,
        "sent": 2,
        "completed": 2,
        "failed": 0,
        "success_rate": 1.0,
        "errors_json": "{}",
        "total_input_tokens": 128,
        "total_output_tokens": 8,
        "output_throughput": 100.0,
        "request_throughput": 2.0,
        "total_token_throughput": 136.0,
        "goodput": None,
        "ttft_ms_p50": 10.0,
        "ttft_ms_p99": 20.0,
        "ttfo_ms_p50": None,
        "ttfo_ms_p99": None,
        "tpot_ms_p50": 5.0,
        "tpot_ms_p99": 6.0,
        "itl_ms_p50": 5.0,
        "itl_ms_p99": 6.0,
        "e2e_ms_p50": 50.0,
        "e2e_ms_p99": 60.0,
        "ttft_from_scheduled_ms_p50": None,
        "ttft_from_scheduled_ms_p99": None,
        "e2e_from_scheduled_ms_p50": None,
        "e2e_from_scheduled_ms_p99": None,
        "send_lag_ms_p50": None,
        "send_lag_ms_p99": None,
        "loop_lag_ms_p50": None,
        "loop_lag_ms_p99": None,
        "loop_lag_ms_max": None,
        "client_bound": False,
        "peak_gpu_memory_mib": [],
        "peak_gpu_memory_mib_total": None,
        "peak_rss_mib": 600.0,
        "load_time_s": None,
        "load_breakdown_json": None,
        "engine_kernels_json": None,
        "target_kind": "bundled",
        "base_url": "http://x",
        "model": "tiny",
        "endpoint": "completions",
        "workload_hash": "w",
        "config_hash": "c",
        "config_yaml": "",
        "git_commit": "0123456789abcdef",
        "git_dirty": False,
        "hardware_key": "cpu",
        "environment_json": "{}",
    }
    return RunRecord(**(base | fields))


def side(label: str) -> Side:
    """One build of a comparison, as compare describes it, with every field set."""
    return Side(
        label=label,
        source=f"results/{label}",
        run_dirs=[f"results/{label}/r"],
        model="tiny",
        target_kind="bundled",
        engine="",
        kernels="",
        git_commit="0123456789abcdef",
        git_dirty=False,
        hardware_key="cpu",
        started_at="2026-01-01T00:00:00+00:00",
    )
