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

from omegaconf import DictConfig, OmegaConf

from runtime.model_names import check_model

SCENARIOS_DIR = Path(__file__).resolve().parent.parent / "scenarios"

ENDPOINTS = ("completions", "chat")
PROMPT_FORMATS = ("auto", "token_ids", "text")
TARGET_KINDS = ("openai", "refserver", "bundled")
SEARCHES = ("concurrency", "rate")


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
class ScenarioConfig:
    name: str
    description: str
    input_tokens: tuple[int, ...]
    output_tokens: tuple[int, ...]
    range_ratio: float
    concurrency: tuple[int, ...]
    request_rate: tuple[float, ...] | None
    max_concurrency: int | None
    burstiness: float
    num_requests: int
    repeats: int
    warmup_requests: int
    search: str | None  # None: the levels below; concurrency | rate: a capacity search

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
    return ScenarioConfig(
        name=str(_str(k + "name", c["name"])),
        description=str(c.get("description") or ""),
        input_tokens=ins,
        output_tokens=outs,
        range_ratio=_range_ratio(c["range_ratio"]),
        concurrency=_int_list(k + "concurrency", c["concurrency"]),
        request_rate=rates,
        max_concurrency=None if max_conc is None else _int(k + "max_concurrency", max_conc),
        burstiness=_float(k + "burstiness", c["burstiness"]),
        num_requests=_int(k + "num_requests", c["num_requests"]),
        repeats=_int(k + "repeats", c["repeats"]),
        warmup_requests=_int(k + "warmup_requests", c["warmup_requests"], minimum=0),
        search=search,
    )


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
        resolved_yaml=_recordable_yaml(raw),
    )


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
    """The resolved config as recorded with results: secrets masked, since runs get shared."""
    if raw["target"].get("api_key"):
        raw = {**raw, "target": {**raw["target"], "api_key": "***"}}
    return OmegaConf.to_yaml(OmegaConf.create(raw))
