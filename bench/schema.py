"""The schema of the Hydra config tree under scenarios/: every key and its type.

Registered in Hydra's ConfigStore as `schema`, the first entry of scenarios/config.yaml's
defaults list, it makes Hydra refuse a wrong type, or a key no file declares, while composing.
No field has a default: the YAML files hold the values (one source of truth), and a key missing
from them would show as ??? and fail in bench.config.from_hydra.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class DatasetSchema:
    path: str | None
    format: str
    prompt_column: str
    output_column: str | None


@dataclass
class ScenarioSchema:
    name: str
    description: str
    input_tokens: Any  # an integer or a list of them (OmegaConf has no union types)
    output_tokens: Any  # an integer or a list of them
    length_distribution: str
    range_ratio: float
    length_sd: float
    length_sigma: float
    dataset: DatasetSchema
    prefix_groups: int
    prefix_tokens: int
    trace_path: str | None
    time_scale: float
    concurrency: Any  # an integer or a list of them
    request_rate: Any  # a number, a list of them, or null
    max_concurrency: int | None
    burstiness: float
    num_requests: int
    repeats: int
    warmup_requests: int
    search: str | None
    turns: int
    think_time_s: float
    ramp_up_s: float


@dataclass
class TargetSchema:
    kind: str
    base_url: str | None
    model: str | None
    endpoint: str
    api_key: str | None
    tokenizer: str | None
    ignore_eos: bool
    continuous_usage_stats: bool
    extra_body: dict[str, Any]  # free-form: any key
    server_args: dict[str, Any]  # free-form: any key
    startup_timeout_s: float


@dataclass
class RuntimeSchema:
    """The bundled engine's knobs (scenarios/target/bundled.yaml), passed to it as flags."""

    max_num_seqs: int | None
    max_num_batched_tokens: int | None
    max_model_len: int | None
    block_size: int | None
    num_kv_blocks: int | None
    gpu_memory_utilization: float | None
    enable_prefix_caching: bool | None
    enforce_eager: bool | None
    dtype: str | None
    load_format: str | None
    quantization: str | None
    tensor_parallel_size: int | None
    seed: int | None
    tokenizer: str | None
    log_level: str | None


@dataclass
class BaselineSchema:
    save: str | None
    dir: str
    keep: int


@dataclass
class WorkloadSchema:
    prompt_format: str
    token_id_low: int
    token_id_high: int


@dataclass
class ClientSchema:
    request_timeout_s: float
    lag_threshold_ms: float
    max_consecutive_connection_errors: int
    workers: Any  # a whole number or "auto"
    backend: str
    ray_address: str | None
    pin_workers: bool
    streams_per_worker: int
    tokens_per_s_per_worker: float
    allow_busy_server: bool


@dataclass
class SloSchema:
    ttft_ms: float | None
    tpot_ms: float | None
    e2e_ms: float | None
    percentile: float
    success: float | None


@dataclass
class CapacitySchema:
    growth: float
    max_load: float
    rate_precision: float
    confidence: float
    requests_per_user: int


@dataclass
class TelemetrySchema:
    interval_s: float
    scrape_server_metrics: bool
    server_metrics_interval_s: float


@dataclass
class BenchSchema:
    results_dir: str
    resume: str | None
    baseline: BaselineSchema
    seed: int
    progress: bool
    workload: WorkloadSchema
    client: ClientSchema
    slo: SloSchema
    capacity: CapacitySchema
    telemetry: TelemetrySchema
    scenario: ScenarioSchema
    target: TargetSchema
    runtime: RuntimeSchema | None  # null unless target=bundled


ConfigStore.instance().store(name="schema", node=BenchSchema)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def expected_type(key: str) -> str | None:
    """What the schema declares `key` to be, in words; None for a key it does not declare."""
    kind: Any = BenchSchema
    for part in key.split("."):
        kind = _strip_none(kind)
        hints = typing.get_type_hints(kind) if is_dataclass(kind) else {}
        if part not in hints:
            return None
        kind = hints[part]
    words = _TYPE_WORDS.get(_strip_none(kind), "a mapping")
    return words + " or null" if _strip_none(kind) is not kind else words


def _strip_none(kind: Any) -> Any:
    """X for `X | None`, else `kind` itself."""
    if isinstance(kind, types.UnionType):
        rest = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else kind
    return kind
