"""What an A/B comparison found: the records `bench.compare` computes and `bench.report` renders.

The unit of comparison is the run: one repeat of one load level (a row of runs.parquet).
Per-request samples only feed the diagnostic quantile CIs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pandas as pd

from bench.stats import RatioTest, Verdict


@dataclass(frozen=True)
class Metric:
    column: str  # in runs.parquet
    label: str  # as shown in reports
    unit: str
    higher_is_better: bool


@dataclass(frozen=True)
class Side:
    """One build: where its runs came from and what they say about themselves."""

    label: str  # "baseline", "candidate"
    source: str  # the baseline name or path given on the command line
    run_dirs: list[str]
    model: str
    target_kind: str
    engine: str  # the engine knobs that differ from defaults, e.g. "quantization=int8", or ""
    kernels: str  # what the engine computed with ("attention=cpu-kernel ..."), or ""
    git_commit: str | None
    git_dirty: bool | None
    hardware_key: str
    started_at: str  # earliest run start, ISO 8601


@dataclass(frozen=True)
class Level:
    """A load level present in both builds."""

    scenario: str
    concurrency: int | None
    request_rate: float | None
    input_tokens: int
    output_tokens: int

    @property
    def name(self) -> str:
        if self.concurrency is None and self.request_rate is None:
            return self.scenario  # not a load level: e.g. "server start" for load time
        if self.request_rate is None:
            load = f"c={self.concurrency}"
        else:
            load = f"{self.request_rate:g} req/s"
        return f"{self.scenario} {self.input_tokens}/{self.output_tokens} {load}"


def levels_of(runs: pd.DataFrame) -> dict[Level, pd.DataFrame]:
    """runs.parquet rows grouped by load level: scenario, lengths and load (open loop has no
    concurrency, or its in-flight cap)."""
    keys = ["scenario", "concurrency", "request_rate", "input_tokens", "output_tokens"]
    out = {}
    for key, frame in runs.groupby(keys, dropna=False, sort=True):
        scenario, concurrency, rate, inp, outp = cast(tuple[Any, ...], key)
        level = Level(
            str(scenario),
            None if pd.isna(concurrency) else int(concurrency),
            None if pd.isna(rate) else float(rate),
            int(inp),
            int(outp),
        )
        out[level] = frame
    return out


@dataclass(frozen=True)
class Row:
    """One metric at one load level: per-run values of both builds, tested."""

    level: Level
    metric: Metric
    baseline: list[float]  # one value per run
    candidate: list[float]
    baseline_median: float
    candidate_median: float
    test: RatioTest | None  # None when a side has no usable value
    p_adjusted: float  # Holm over every row of the report; nan when untestable
    verdict: Verdict
    gate: float  # regression threshold for this metric (fraction, e.g. 0.05)
    regression: bool  # worse beyond `gate`: fails the comparison

    @property
    def delta_pct(self) -> float:
        return float("nan") if self.test is None else (self.test.ratio - 1.0) * 100.0


@dataclass(frozen=True)
class QuantileRow:
    """A per-request latency quantile, pooled over runs, with a hierarchical bootstrap CI."""

    level: Level
    column: str  # ttft_ms | e2e_ms | itl_ms
    q: float
    baseline: float
    candidate: float
    ratio: float
    ci_low: float
    ci_high: float
    samples: tuple[int, int]  # pooled requests (or ITL gaps) per side


@dataclass(frozen=True)
class MemoryRow:
    """Peak memory per GPU (or peak RSS on CPU), compared exactly with a tolerance."""

    level: Level
    device: str  # "gpu0", "gpu1", ..., or "rss"
    baseline_mib: float  # median over runs
    candidate_mib: float
    delta_pct: float
    verdict: Verdict  # beyond the tolerance: better (less) or worse (more); else ~


@dataclass(frozen=True)
class Geomean:
    """Per metric: the geometric mean over levels of the candidate/baseline ratio."""

    metric: Metric
    ratio: float


@dataclass
class Comparison:
    mode: str  # "stored baseline" | "interleaved"
    baseline: Side
    candidate: Side
    alpha: float
    threshold: float  # the noise threshold a verdict must exceed
    rows: list[Row] = field(default_factory=list)
    quantiles: list[QuantileRow] = field(default_factory=list)
    memory: list[MemoryRow] = field(default_factory=list)
    geomeans: list[Geomean] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)  # accepted with allow_mismatch=true
    warnings: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.regression]

    def counts(self) -> dict[str, int]:
        """How many rows improved, regressed (verdict worse) and did not change."""
        out = {"better": 0, "worse": 0, "~": 0}
        for row in self.rows:
            out[row.verdict] += 1
        return out
