"""The rows the harness writes, as typed records with their Arrow schemas.

docs/metrics.md documents every column; bump SCHEMA_VERSION with any change to them, and list
in bench/store.py what an older version lacks if the store still reads it.
Times named *_s are seconds on the monotonic clock, relative to the run's `monotonic_origin_s`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 6


@dataclass(frozen=True)
class RequestRecord:
    schema_version: int
    run_id: str
    scenario: str
    repeat: int  # -1 for warm-up requests, which are never written
    level: int
    input_tokens: int  # the workload's intended prompt length
    output_tokens_requested: int
    concurrency: int | None
    request_rate: float | None
    index: int
    # The workload's group of requests that belong together (a shared prefix, a conversation)
    # and this request's place in it; null where the workload has no groups.
    group_id: int | None
    group_position: int | None
    # Sent during scenario.ramp_up_s (by its intended send time): recorded, but left out of the
    # level's statistics (bench.metrics.summarize, bench.levels.level_requests).
    ramp_up: bool
    request_id: str  # sent as X-Request-Id, to join with server-side logs
    worker: int  # the client worker process that sent it (client.workers); 0 with one
    ok: bool
    error: str | None
    error_message: str | None
    http_status: int | None
    prompt_tokens: int | None  # as the server's usage counted it
    output_tokens: int | None
    reasoning_tokens: int | None  # of output_tokens; null when there were none
    output_tokens_source: str | None
    token_attribution: str | None
    events: int  # token-bearing SSE events; < output_tokens when a server batches tokens
    scheduled_s: float
    sent_s: float
    first_token_s: float | None
    end_s: float
    send_lag_ms: float
    ttft_ms: float | None
    ttfo_ms: float | None  # to the first answer token; null unless reasoning streamed first
    tpot_ms: float | None
    e2e_ms: float | None
    ttft_from_scheduled_ms: float | None
    e2e_from_scheduled_ms: float | None
    itl_ms: list[float]
    event_ms: list[float]  # arrival of each token-bearing event after the send
    event_tokens: list[int]
    # As the server saw the request (usage.timings; null for servers that do not report it).
    server_queue_ms: float | None
    server_prefill_ms: float | None
    server_decode_ms: float | None
    server_e2e_ms: float | None


@dataclass(frozen=True)
class RunRecord:
    """One load level of one repeat: the unit that comparisons test."""

    schema_version: int
    run_id: str
    scenario: str
    repeat: int
    level: int
    input_tokens: int
    output_tokens: int
    concurrency: int | None
    request_rate: float | None
    status: str  # complete | partial
    stopped_early: str | None
    started_at: str  # ISO 8601, UTC
    ended_at: str
    monotonic_origin_s: float
    duration_s: float
    num_requests: int  # planned
    sent: int
    completed: int
    failed: int
    success_rate: float | None
    errors_json: str  # {"refused": 3, ...}
    total_input_tokens: int
    total_output_tokens: int
    output_throughput: float
    request_throughput: float
    total_token_throughput: float
    goodput: float | None
    ttft_ms_mean: float | None
    ttft_ms_p50: float | None
    ttft_ms_p90: float | None
    ttft_ms_p99: float | None
    ttfo_ms_p50: float | None  # over the requests with a ttfo_ms; null when none has one
    ttfo_ms_p99: float | None
    tpot_ms_mean: float | None
    tpot_ms_p50: float | None
    tpot_ms_p90: float | None
    tpot_ms_p99: float | None
    itl_ms_mean: float | None
    itl_ms_p50: float | None
    itl_ms_p90: float | None
    itl_ms_p99: float | None
    e2e_ms_mean: float | None
    e2e_ms_p50: float | None
    e2e_ms_p90: float | None
    e2e_ms_p99: float | None
    ttft_from_scheduled_ms_p50: float | None
    ttft_from_scheduled_ms_p99: float | None
    e2e_from_scheduled_ms_p50: float | None
    e2e_from_scheduled_ms_p99: float | None
    send_lag_ms_p50: float | None
    send_lag_ms_p99: float | None
    loop_lag_ms_p50: float | None
    loop_lag_ms_p99: float | None
    loop_lag_ms_max: float | None
    client_bound: bool  # some worker's loop lag p99 above client.lag_threshold_ms
    # The client's workers (client.workers) and, per worker that ran a part of the level, its
    # loop lag p99, its send lag p99, and its clock's offset to the coordinator's with the
    # offset's uncertainty (0 for processes on the coordinator's host, which share its clock).
    workers: int
    worker_loop_lag_ms_p99: list[float]
    worker_send_lag_ms_p99: list[float]
    worker_clock_offset_ms: list[float]
    worker_clock_uncertainty_ms: list[float]
    peak_gpu_memory_mib: list[float]  # per GPU index; empty without NVML
    peak_gpu_memory_mib_total: float | None
    peak_rss_mib: float | None  # managed server process tree, the CPU stand-in for VRAM
    load_time_s: float | None  # managed server: spawn to first healthy response
    load_breakdown_json: str | None  # the engine's own phases (read, place, KV cache, warm-up)
    engine_kernels_json: str | None  # what the engine computes with, as its model card says
    target_kind: str
    base_url: str
    model: str
    endpoint: str
    workload_hash: str
    config_hash: str
    config_yaml: str
    git_commit: str | None
    git_dirty: bool | None
    hardware_key: str
    environment_json: str
    # The machine's speed (bench.probe.Probe, JSON) before the session's server started and
    # after it stopped; the same in every row of a run. The after probe is written when the
    # session ends: null while it runs, and in a session stopped by a signal.
    probe_before_json: str | None = None
    probe_after_json: str | None = None


@dataclass(frozen=True)
class TelemetryRecord:
    schema_version: int
    run_id: str
    t_s: float  # relative to the run's monotonic origin
    source: str  # gpu0, gpu1, ..., process (managed server tree), client
    metric: str  # memory_used_mib, gpu_util_pct, rss_mib, loop_lag_ms
    value: float


# Annotations are strings (postponed evaluation); "X | None" columns are nullable in Arrow anyway.
_ARROW_TYPES = {
    "int": pa.int64(),
    "float": pa.float64(),
    "str": pa.string(),
    "bool": pa.bool_(),
    "list[float]": pa.list_(pa.float64()),
    "list[int]": pa.list_(pa.int64()),
}


def _schema_of(record: type) -> pa.Schema:
    return pa.schema(
        (f.name, _ARROW_TYPES[str(f.type).removesuffix(" | None")])
        for f in dataclasses.fields(record)
    )


REQUESTS_SCHEMA = _schema_of(RequestRecord)
RUNS_SCHEMA = _schema_of(RunRecord)
TELEMETRY_SCHEMA = _schema_of(TelemetryRecord)


def to_table(rows: list[Any], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([dataclasses.asdict(r) for r in rows], schema=schema)
