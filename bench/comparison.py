"""What an A/B comparison found: the records `bench.compare` computes and `bench.report` renders.

The unit of comparison is the run: one repeat of one load level (a row of runs.parquet).
Per-request samples only feed the diagnostic quantile CIs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.levels import Level
from bench.stats import RatioTest, Verdict


@dataclass(frozen=True)
class Metric:
    """A per-run value the comparison tests: one value per run (load time: per server start)."""

    column: str  # in runs.parquet
    label: str  # "TTFT p99", "out tok/s"
    unit: str
    higher_is_better: bool
    over: str = "runs"  # what one value belongs to: "runs", or "server starts" for load time

    @property
    def name(self) -> str:
        """What a row shows, named apart from the level statistics of bench.levels (a pooled
        "TTFT p99", a mean "out tok/s"): "TTFT p99 ms (geomean of runs)"."""
        unit = "" if not self.unit or self.label.endswith(self.unit) else f" {self.unit}"
        return f"{self.label}{unit} (geomean of {self.over})"


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
    hardware_key: str  # the machine in one line (environment.Machine.key)
    started_at: str  # earliest run start, ISO 8601
    # For the baseline: the commits of the candidate's history that this build's commit lacks
    # (git rev-list --count BASE..CANDIDATE); None where either commit is unknown to git.
    commits_behind: int | None = None


@dataclass(frozen=True)
class Row:
    """One metric at one load level: per-run values of both builds, tested.

    The values shown are each side's geometric mean, whose ratio is the test's `ratio`: the
    change shown beside them is always candidate / baseline - 1 of the values shown.
    """

    level: Level | None  # None: not a load level (load time, one value per server start)
    metric: Metric
    baseline: list[float]  # one value per run
    candidate: list[float]
    baseline_geomean: float  # nan when a side has no value > 0
    candidate_geomean: float
    test: RatioTest | None  # None when a side has no usable value
    p_adjusted: float  # Holm over every row of the report; nan when untestable
    verdict: Verdict
    gate: float  # regression threshold for this metric (fraction, e.g. 0.05)
    regression: bool  # worse beyond `gate`: fails the comparison

    @property
    def where(self) -> str:
        return "server start" if self.level is None else self.level.name

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
    """A level's peak memory (bench.levels.peak_memory), compared exactly with a tolerance."""

    level: Level
    kind: str  # "GPU" (the total of every GPU) or "RSS" (the server's, on CPU)
    baseline_mib: float  # the maximum over runs
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
