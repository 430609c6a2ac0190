"""Typed views of the Hydra config tree under scenarios/.

The YAML files hold every default and bench/schema.py every key's type; bench/compose.py
composes a command line's config. `from_hydra` checks ranges and turns the composed DictConfig
into frozen dataclasses, so a bad value is reported with its full key and what was expected
instead of failing somewhere deep in a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from omegaconf import DictConfig, OmegaConf

from runtime.model_names import check_model

SCENARIOS_DIR = Path(__file__).resolve().parent.parent / "scenarios"

ENDPOINTS = ("completions", "chat")
PROMPT_FORMATS = ("auto", "token_ids", "text")
CLIENT_BACKENDS = ("local", "ray")
TARGET_KINDS = ("openai", "refserver", "bundled")
SEARCHES = ("concurrency", "rate")
LENGTH_DISTRIBUTIONS = ("fixed", "uniform", "normal", "lognormal", "dataset")
# A dataset's format, and the suffixes `auto` reads it from (a directory: `save_to_disk`).
DATASET_FORMATS = {
    "sharegpt": (".json",),
    "jsonl": (".jsonl",),
    "csv": (".csv",),
    "parquet": (".parquet",),
    "arrow": (".arrow",),
}


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and what is allowed."""


def _fail(key: str, expected: str, value: object) -> ConfigError:
    return ConfigError(f"{key}: expected {expected}, got {value!r}")


def _int(key: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(key, f"an integer >= {minimum}", value)
    return value


def _float(key: str, value: object, minimum: float = 0.0, strict: bool = True) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or (value <= minimum if strict else value < minimum):  # type: ignore[operator]
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise _fail(key, f"a number {bound}", value)
    return float(value)  # type: ignore[arg-type]


def _optional_float(key: str, value: object) -> float | None:
    return None if value is None else _float(key, value)


def _int_list(key: str, value: object) -> tuple[int, ...]:
    items = list(value) if isinstance(value, list | tuple) else [value]
    if not items:
        raise _fail(key, "an integer >= 1 or a non-empty list of them", value)
    return tuple(_int(key, v) for v in items)


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _fail(key, "one of " + ", ".join(allowed), value)
    return str(value)


def _str(key: str, value: object, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise _fail(key, "a non-empty string" + (" or null" if optional else ""), value)
    return value


@dataclass(frozen=True)
class LoadLevel:
    """One (lengths, load) point of a scenario; each is run `repeats` times."""

    index: int
    input_tokens: int
    output_tokens: int
    concurrency: int | None  # closed loop: users; open loop: cap on in-flight (None = no cap)
    request_rate: float | None  # None = closed loop

    @property
    def label(self) -> str:
        """As every output names the level: "64/128 c=8", "64/128 2/s ≤8"."""
        # Imported here: bench.levels reads results with pandas and imports bench.metrics,
        # which imports this module.
        from bench.levels import label

        return label(self.input_tokens, self.output_tokens, self.concurrency, self.request_rate)


@dataclass(frozen=True)
class DatasetConfig:
    """A local file of prompts (bench/datasets.py reads it)."""

    path: str
    format: str  # one of DATASET_FORMATS, `auto` already resolved
    prompt_column: str
    output_column: str | None  # a token count or a reply whose tokens are counted


@dataclass(frozen=True)
class ScenarioConfig:
    name: str
    description: str
    # A trace replay's are the trace's mean lengths (the level's label); each request has its own.
    input_tokens: tuple[int, ...]
    output_tokens: tuple[int, ...]
    length_distribution: str
    range_ratio: float
    length_sd: float  # normal: standard deviation as a fraction of the mean
    length_sigma: float  # lognormal: the sigma of the log of the length
    dataset: DatasetConfig | None
    prefix_groups: int  # 0: no shared prefixes
    prefix_tokens: int
    trace_path: str | None
    time_scale: float
    concurrency: tuple[int, ...]
    request_rate: tuple[float, ...] | None
    max_concurrency: int | None
    burstiness: float
    num_requests: int
    repeats: int
    warmup_requests: int
    search: str | None  # None: the levels below; concurrency | rate: a capacity search
    turns: int  # requests per conversation; 1: every request stands alone
    think_time_s: float  # a conversation's pause between a reply and the next turn
    ramp_up_s: float  # users start, or the arrival rate rises, over this long; 0: at once

    def shapes(self) -> list[tuple[int, int]]:
        ins, outs = self.input_tokens, self.output_tokens
        if len(ins) == 1:
            ins = ins * len(outs)
        if len(outs) == 1:
            outs = outs * len(ins)
        return list(zip(ins, outs, strict=True))

    def levels(self) -> list[LoadLevel]:
        """The levels known before the run: every level of a sweep; a capacity search's first
        probe (bench/capacity.py chooses the others from what it measures)."""
        loads: list[tuple[int | None, float | None]]
        if self.request_rate is None:
            loads = [(c, None) for c in self.concurrency]
        else:
            loads = [(self.max_concurrency, r) for r in self.request_rate]
        return [
            LoadLevel(i, inp, out, conc, rate)
            for i, ((inp, out), (conc, rate)) in enumerate(
                (shape, load) for shape in self.shapes() for load in loads
            )
        ]


@dataclass(frozen=True)
class TargetConfig:
    kind: str
    base_url: str | None  # None until a managed server is started
    model: str | None  # None: the first model the server lists
    endpoint: str
    api_key: str | None
    tokenizer: str | None
    ignore_eos: bool
    continuous_usage_stats: bool
    extra_body: Mapping[str, Any]
    server_args: Mapping[str, Any]
    startup_timeout_s: float

    @property
    def managed(self) -> bool:
        """Whether the harness starts (and stops) the server itself."""
        return self.kind != "openai"


@dataclass(frozen=True)
class WorkloadConfig:
    prompt_format: str
    token_id_low: int
    token_id_high: int


@dataclass(frozen=True)
class ClientConfig:
    request_timeout_s: float
    lag_threshold_ms: float
    max_consecutive_connection_errors: int
    workers: int | None  # None: auto (bench.workers.auto_workers)
    backend: str  # one of CLIENT_BACKENDS
    ray_address: str | None
    pin_workers: bool
    streams_per_worker: int
    tokens_per_s_per_worker: float
    allow_busy_server: bool


@dataclass(frozen=True)
class SloConfig:
    ttft_ms: float | None
    tpot_ms: float | None
    e2e_ms: float | None
    percentile: float  # the capacity search judges this percentile of each latency
    success: float | None  # capacity only: the least share of requests that must succeed

    @property
    def latency_bounds(self) -> dict[str, float]:
        """The latency objectives set: metric (ttft_ms, tpot_ms, e2e_ms) -> bound in ms."""
        bounds = {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "e2e_ms": self.e2e_ms}
        return {k: v for k, v in bounds.items() if v is not None}


@dataclass(frozen=True)
class CapacityConfig:
    growth: float
    max_load: float
    rate_precision: float
    confidence: float
    requests_per_user: int


@dataclass(frozen=True)
class BenchConfig:
    scenario: ScenarioConfig
    target: TargetConfig
    workload: WorkloadConfig
    client: ClientConfig
    slo: SloConfig
    capacity: CapacityConfig
    results_dir: str
    baseline_save: str | None  # also keep the run as a session of this named baseline
    baselines_dir: str
    baseline_keep: int  # sessions a baseline keeps per scenario, the newest
    seed: int
    progress: bool
    telemetry_interval_s: float
    scrape_server_metrics: bool
    server_metrics_interval_s: float
    resume: str | None  # a run directory to go on with (bench/resume.py)
    resolved_yaml: str  # the whole resolved config, recorded with every run


def _scenario(c: Mapping[str, Any]) -> ScenarioConfig:
    k = "scenario."
    rate = c["request_rate"]
    rates: tuple[float, ...] | None = None
    if rate is not None:
        items = list(rate) if isinstance(rate, list | tuple) else [rate]
        if not items:
            raise _fail(k + "request_rate", "a number > 0, a list of them, or null", rate)
        rates = tuple(_float(k + "request_rate", r) for r in items)
    ins = _int_list(k + "input_tokens", c["input_tokens"])
    outs = _int_list(k + "output_tokens", c["output_tokens"])
    if len(ins) > 1 and len(outs) > 1 and len(ins) != len(outs):
        raise ConfigError(
            f"scenario.input_tokens and scenario.output_tokens are zipped into a length table "
            f"and must have equal lengths (or one of them a single value); got {len(ins)} and "
            f"{len(outs)}"
        )
    max_conc = c["max_concurrency"]
    search = c["search"]
    if search is not None:
        _check_search(_choice(k + "search", search, SEARCHES), ins, outs, c, rates)
    dataset = _dataset(c["dataset"])
    distribution = _distribution(c, dataset)
    groups = _int(k + "prefix_groups", c["prefix_groups"], minimum=0)
    prefix = _int(k + "prefix_tokens", c["prefix_tokens"], minimum=0)
    if groups:
        _check_prefix(prefix, ins, dataset)
    num_requests = _int(k + "num_requests", c["num_requests"])
    trace_path = _str(k + "trace_path", c["trace_path"], optional=True)
    turns = _int(k + "turns", c["turns"])
    think_time_s = _float(k + "think_time_s", c["think_time_s"], strict=False)
    ramp_up_s = _float(k + "ramp_up_s", c["ramp_up_s"], strict=False)
    _check_turns(c, turns, think_time_s, num_requests)
    if ramp_up_s and (trace_path is not None or search is not None):
        raise ConfigError(
            "scenario.ramp_up_s: a trace replay keeps the trace's own send times and a capacity "
            "search measures every load from its start; set scenario.ramp_up_s=0"
        )
    time_scale = _float(k + "time_scale", c["time_scale"])
    if trace_path is not None:
        # The trace sets the level: its mean lengths (the label) and its mean arrival rate, so
        # the level goes down the open loop with the trace's own send times.
        _check_trace(c, dataset, groups)
        from bench import traces  # imported here: bench.traces raises this module's ConfigError

        summary = traces.summary(traces.load(trace_path), num_requests, time_scale)
        ins, outs = (summary.input_tokens,), (summary.output_tokens,)
        rates, num_requests = (summary.request_rate,), summary.requests
    if dataset is not None:
        ins, outs = _dataset_lengths(dataset, distribution, outs)
    return ScenarioConfig(
        name=str(_str(k + "name", c["name"])),
        description=str(c.get("description") or ""),
        input_tokens=ins,
        output_tokens=outs,
        length_distribution=distribution,
        range_ratio=_range_ratio(c["range_ratio"]),
        length_sd=_float(k + "length_sd", c["length_sd"]),
        length_sigma=_float(k + "length_sigma", c["length_sigma"]),
        dataset=dataset,
        prefix_groups=groups,
        prefix_tokens=prefix,
        trace_path=trace_path,
        time_scale=time_scale,
        concurrency=_int_list(k + "concurrency", c["concurrency"]),
        request_rate=rates,
        max_concurrency=None if max_conc is None else _int(k + "max_concurrency", max_conc),
        burstiness=_float(k + "burstiness", c["burstiness"]),
        num_requests=num_requests,
        repeats=_int(k + "repeats", c["repeats"]),
        warmup_requests=_int(k + "warmup_requests", c["warmup_requests"], minimum=0),
        search=search,
        turns=turns,
        think_time_s=think_time_s,
        ramp_up_s=ramp_up_s,
    )


def _check_turns(c: Mapping[str, Any], turns: int, think_time_s: float, num_requests: int) -> None:
    """Conversations are a closed loop of random or dataset prompts, whole ones per level."""
    if turns == 1:
        if think_time_s:
            raise ConfigError(
                "scenario.think_time_s: the pause between a conversation's turns, and "
                "scenario.turns is 1; set scenario.turns > 1 or scenario.think_time_s=0"
            )
        return
    _exclusive(
        "scenario.turns: conversations (turns > 1) are a closed loop of users, each "
        "conversation its own group",
        ("scenario.request_rate", c["request_rate"] is not None),
        ("scenario.prefix_groups", c["prefix_groups"] != 0),
        ("scenario.trace_path", c["trace_path"] is not None),
        ("scenario.search", c["search"] is not None),
    )
    if num_requests % turns:
        raise ConfigError(
            f"scenario.num_requests: counts the turns of whole conversations, so expected a "
            f"multiple of scenario.turns ({turns}), got {num_requests}"
        )


def _dataset(c: Mapping[str, Any]) -> DatasetConfig | None:
    k = "scenario.dataset."
    path = _str(k + "path", c["path"], optional=True)
    if path is None:
        return None
    if not Path(path).exists():
        raise ConfigError(
            f"{k}path: no such file or directory {path!r} (relative paths start from the "
            "working directory); the demo file is scenarios/data/conversations.json"
        )
    fmt = _choice(k + "format", c["format"], ("auto", *DATASET_FORMATS))
    if fmt == "auto":
        fmt = _dataset_format(path)
    return DatasetConfig(
        path=path,
        format=fmt,
        prompt_column=str(_str(k + "prompt_column", c["prompt_column"])),
        output_column=_str(k + "output_column", c["output_column"], optional=True),
    )


def _dataset_format(path: str) -> str:
    """The format `auto` means for `path`: from its suffix; a directory is `save_to_disk`'s."""
    if Path(path).is_dir():
        return "arrow"
    suffix = Path(path).suffix.lower()
    for fmt, suffixes in DATASET_FORMATS.items():
        if suffix in suffixes:
            return fmt
    known = ", ".join(f"{s} ({f})" for f, ss in DATASET_FORMATS.items() for s in ss)
    raise ConfigError(
        f"scenario.dataset.format: auto cannot tell the format of {path!r} from its suffix "
        f"(known: {known}, or a save_to_disk directory); set scenario.dataset.format"
    )


def _distribution(c: Mapping[str, Any], dataset: DatasetConfig | None) -> str:
    k = "scenario."
    distribution = _choice(
        k + "length_distribution", c["length_distribution"], LENGTH_DISTRIBUTIONS
    )
    if distribution == "dataset" and dataset is None:
        raise ConfigError(
            "scenario.length_distribution=dataset takes the lengths of a dataset's rows: set "
            "scenario.dataset.path=FILE (scenario=dataset uses the demo file)"
        )
    if distribution != "uniform" and c["range_ratio"] != 0:
        raise ConfigError(
            f"scenario.range_ratio: spreads lengths of length_distribution=uniform only, and "
            f"the distribution is {distribution}; set scenario.range_ratio=0"
        )
    return distribution


def _check_prefix(prefix: int, ins: tuple[int, ...], dataset: DatasetConfig | None) -> None:
    if dataset is not None:
        raise ConfigError(
            "scenario.prefix_groups: shared prefixes are built of random tokens, and "
            "scenario.dataset.path sends the dataset's own prompts; set one of them"
        )
    if prefix < 1:
        raise _fail("scenario.prefix_tokens", "an integer >= 1 with scenario.prefix_groups", prefix)
    if min(ins) <= prefix:
        raise ConfigError(
            f"scenario.prefix_tokens: expected fewer than scenario.input_tokens ({min(ins)}), "
            f"so that every request has tokens of its own after the prefix; got {prefix}"
        )


def _dataset_lengths(
    dataset: DatasetConfig, distribution: str, outs: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A dataset's requests keep their own prompts (and, with length_distribution=dataset, their
    own output lengths): the level is named by the file's mean lengths, in words where no
    tokenizer counts them, as a trace's level is by the trace's."""
    from bench import datasets  # imported here: bench.datasets raises this module's ConfigError

    rows = datasets.load(dataset, None).rows
    ins = (max(1, round(float(np.mean([r.input_tokens for r in rows])))),)
    known = [r.output_tokens for r in rows if r.output_tokens is not None]
    if distribution == "dataset" and known:
        outs = (max(1, round(float(np.mean(known)))),)
    return ins, outs


def _check_trace(c: Mapping[str, Any], dataset: DatasetConfig | None, groups: int) -> None:
    """A trace sets lengths, prompts and arrival times itself."""
    _exclusive(
        "scenario.trace_path: a trace gives every request's prompt, lengths and send time",
        ("scenario.dataset.path", dataset is not None),
        ("scenario.prefix_groups", groups > 0),
        ("scenario.search", c["search"] is not None),
    )


def _exclusive(why: str, *others: tuple[str, bool]) -> None:
    """Refuse the keys of `others` that are set, which `why` rules out."""
    clash = [key for key, is_set in others if is_set]
    if clash:
        raise ConfigError(f"{why}; unset {', '.join(clash)}")


def _check_search(
    search: str,
    ins: tuple[int, ...],
    outs: tuple[int, ...],
    c: Mapping[str, Any],
    rates: tuple[float, ...] | None,
) -> None:
    """A search starts from one load at one pair of lengths."""
    if len(ins) > 1 or len(outs) > 1:
        raise ConfigError(
            "scenario.search: a capacity search measures one pair of lengths; set "
            "scenario.input_tokens and scenario.output_tokens to single values"
        )
    if search == "rate" and (rates is None or len(rates) != 1):
        raise _fail(
            "scenario.request_rate", "one rate to start the search=rate from", c["request_rate"]
        )
    if search == "concurrency":
        if rates is not None:
            raise ConfigError(
                "scenario.request_rate: search=concurrency is a closed loop; set it to null, or "
                "search over the rate with scenario.search=rate"
            )
        if isinstance(c["concurrency"], list | tuple) and len(c["concurrency"]) != 1:
            raise _fail(
                "scenario.concurrency",
                "one number of users to start the search from",
                c["concurrency"],
            )


def _range_ratio(value: object) -> float:
    ratio = _float("scenario.range_ratio", value, strict=False)
    if ratio >= 1.0:
        raise _fail("scenario.range_ratio", "a number in [0, 1)", value)
    return ratio


def _target(c: Mapping[str, Any]) -> TargetConfig:
    k = "target."
    kind = _choice(k + "kind", c["kind"], TARGET_KINDS)
    base_url = _str(k + "base_url", c["base_url"], optional=kind != "openai")
    if base_url is not None and not base_url.startswith(("http://", "https://")):
        raise _fail(k + "base_url", "a URL starting with http:// or https://", base_url)
    for flag in ("ignore_eos", "continuous_usage_stats"):
        if not isinstance(c[flag], bool):
            raise _fail(k + flag, "true or false", c[flag])
    for table in ("extra_body", "server_args"):
        if not isinstance(c[table], Mapping):
            raise _fail(k + table, "a mapping, e.g. {temperature: 0}", c[table])
    model = _str(k + "model", c["model"], optional=True)
    if kind == "bundled" and model is not None:
        _check_bundled_model(model, c["server_args"].get("load_format"))
    return TargetConfig(
        kind=kind,
        base_url=base_url.rstrip("/") if base_url else None,
        model=model,
        endpoint=_choice(k + "endpoint", c["endpoint"], ENDPOINTS),
        api_key=_str(k + "api_key", c["api_key"], optional=True),
        tokenizer=_str(k + "tokenizer", c["tokenizer"], optional=True),
        ignore_eos=c["ignore_eos"],
        continuous_usage_stats=c["continuous_usage_stats"],
        extra_body=dict(c["extra_body"]),
        server_args=dict(c["server_args"]),
        startup_timeout_s=_float(k + "startup_timeout_s", c["startup_timeout_s"], strict=False),
    )


def _check_bundled_model(model: str, load_format: object) -> None:
    """The engine's own check of --model, before anything starts."""
    try:
        fmt = load_format if isinstance(load_format, str) else None
        check_model(model, fmt, model_key="target.model:", dummy="runtime.load_format=dummy")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def from_hydra(cfg: DictConfig) -> BenchConfig:
    """Validate the composed Hydra config and return its typed form."""
    raw = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    w, cl, slo, cap = raw["workload"], raw["client"], raw["slo"], raw["capacity"]
    low = _int("workload.token_id_low", w["token_id_low"], minimum=0)
    high = _int("workload.token_id_high", w["token_id_high"], minimum=low + 1)
    scenario, objectives = _scenario(raw["scenario"]), _slo(slo)
    if scenario.turns > 1 and raw["target"]["endpoint"] != "chat":
        raise ConfigError(
            "target.endpoint: scenario.turns > 1 needs the chat endpoint; set target.endpoint=chat"
        )
    if scenario.search and not (objectives.latency_bounds or objectives.success):
        raise ConfigError(
            f"scenario.search={scenario.search} needs an objective to search against: set "
            "slo.ttft_ms, slo.tpot_ms, slo.e2e_ms or slo.success, e.g. slo.ttft_ms=2000"
        )
    return BenchConfig(
        scenario=scenario,
        target=_target(raw["target"]),
        workload=WorkloadConfig(
            prompt_format=_choice("workload.prompt_format", w["prompt_format"], PROMPT_FORMATS),
            token_id_low=low,
            token_id_high=high,
        ),
        client=ClientConfig(
            request_timeout_s=_float("client.request_timeout_s", cl["request_timeout_s"]),
            lag_threshold_ms=_float("client.lag_threshold_ms", cl["lag_threshold_ms"]),
            max_consecutive_connection_errors=_int(
                "client.max_consecutive_connection_errors", cl["max_consecutive_connection_errors"]
            ),
            workers=_workers(cl["workers"]),
            backend=_choice("client.backend", cl["backend"], CLIENT_BACKENDS),
            ray_address=_str("client.ray_address", cl["ray_address"], optional=True),
            pin_workers=bool(cl["pin_workers"]),
            streams_per_worker=_int("client.streams_per_worker", cl["streams_per_worker"]),
            tokens_per_s_per_worker=_float(
                "client.tokens_per_s_per_worker", cl["tokens_per_s_per_worker"]
            ),
            allow_busy_server=bool(cl["allow_busy_server"]),
        ),
        slo=objectives,
        capacity=CapacityConfig(
            growth=_float("capacity.growth", cap["growth"], minimum=1.0),
            max_load=_float("capacity.max_load", cap["max_load"]),
            rate_precision=_float("capacity.rate_precision", cap["rate_precision"]),
            confidence=_fraction("capacity.confidence", cap["confidence"]),
            requests_per_user=_int("capacity.requests_per_user", cap["requests_per_user"]),
        ),
        results_dir=str(_str("results_dir", raw["results_dir"])),
        baseline_save=_str("baseline.save", raw["baseline"]["save"], optional=True),
        baselines_dir=str(_str("baseline.dir", raw["baseline"]["dir"])),
        baseline_keep=_int("baseline.keep", raw["baseline"]["keep"]),
        seed=_int("seed", raw["seed"], minimum=0),
        progress=bool(raw["progress"]),
        telemetry_interval_s=_float("telemetry.interval_s", raw["telemetry"]["interval_s"]),
        scrape_server_metrics=bool(raw["telemetry"]["scrape_server_metrics"]),
        server_metrics_interval_s=_float(
            "telemetry.server_metrics_interval_s", raw["telemetry"]["server_metrics_interval_s"]
        ),
        resume=_str("resume", raw["resume"], optional=True),
        resolved_yaml=_recordable_yaml(raw),
    )


def _workers(value: object) -> int | None:
    if value == "auto":
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail("client.workers", "a whole number of processes >= 1, or auto", value)
    return value


def _fraction(key: str, value: object) -> float:
    number = _float(key, value)
    if number >= 1.0:
        raise _fail(key, "a number in (0, 1)", value)
    return number


def _slo(c: Mapping[str, Any]) -> SloConfig:
    percentile = _float("slo.percentile", c["percentile"])
    if percentile >= 100.0:
        raise _fail("slo.percentile", "a number in (0, 100)", c["percentile"])
    success = c["success"]
    if success is not None and (_float("slo.success", success) > 1.0):
        raise _fail("slo.success", "a share in (0, 1], e.g. 0.99, or null", success)
    return SloConfig(
        ttft_ms=_optional_float("slo.ttft_ms", c["ttft_ms"]),
        tpot_ms=_optional_float("slo.tpot_ms", c["tpot_ms"]),
        e2e_ms=_optional_float("slo.e2e_ms", c["e2e_ms"]),
        percentile=percentile,
        success=None if success is None else float(success),
    )


def _recordable_yaml(raw: dict[str, Any]) -> str:
    """The resolved config as recorded with results: secrets masked, since runs get shared;
    without `resume`, which says where the rows go, not what they measure."""
    raw = {k: v for k, v in raw.items() if k != "resume"}
    if raw["target"].get("api_key"):
        raw = {**raw, "target": {**raw["target"], "api_key": "***"}}
    return OmegaConf.to_yaml(OmegaConf.create(raw))
