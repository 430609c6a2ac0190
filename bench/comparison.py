"""What an A/B comparison found: the records `bench.compare` computes and `bench.report` renders.

The values compared are per run: one repeat of one load level (a row of runs.parquet). What
they are tested against is per session with a stored baseline (the spread between separate
invocations of the harness) and per run in interleaved mode. Per-request samples only feed the
diagnostic quantile CIs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bench.levels import Level
from bench.stats import RatioTest, Verdict

# How the two builds were measured (Comparison.mode).
STORED = "stored baseline"  # the baseline's sessions were stored earlier; the test is per session
INTERLEAVED = "interleaved"  # both builds alternated within one invocation; the test is per run


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
    # Sessions (run directories, each one invocation of the harness; interleaved: rounds) at
    # the level that has the most of them.
    sessions: int = 1


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
    # Why a significant change got no verdict: it lies within the machine's own change of
    # speed (MachineSpeed.drift); None otherwise.
    note: str | None = None

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


@dataclass(frozen=True)
class ProbeFigure:
    """One figure of the machine speed probe (bench/probe.py) on both builds' machines: each
    side's median over its probes, before and after each of its sessions."""

    label: str  # "CPU matmul"
    unit: str  # "GFLOP/s"
    higher_is_better: bool
    baseline: float
    candidate: float
    gates: bool  # counts towards the drift (the figures of the part the engine runs on)

    @property
    def ratio(self) -> float:
        return self.candidate / self.baseline


@dataclass(frozen=True)
class MachineSpeed:
    """How the machine's own speed changed between the builds' sessions and within them.

    Each change is a fraction of the slower speed (0.25: one was 1.25x the other), the largest
    over the figures that gate (`ProbeFigure.gates`). A change of a metric within `drift`
    cannot be told from the machine's, so it gets no verdict.
    """

    figures: list[ProbeFigure]  # those both builds probed
    between: float  # between the builds: their medians
    within: tuple[float, float]  # per build: the median before vs the median after its sessions
    sessions: tuple[int, int]  # probed sessions per build
    cause: str  # the figure and the place of the largest change, "CPU matmul between the builds"

    @property
    def drift(self) -> float:
        return max(self.between, *self.within)


@dataclass(frozen=True)
class CapacityAnswer:
    """One session's capacity search (capacity.json): the capacity and its interval."""

    capacity: float | None  # None: the lowest load tried missed
    low: float | None  # None: nothing certainly met
    high: float | None  # None: never missed up to capacity.max_load


@dataclass(frozen=True)
class CapacityPair:
    """Both builds' capacity searches side by side, one answer per session of each.

    The verdict compares intervals, not point answers: better when every candidate interval
    lies above every baseline interval, worse when below, ~ when they overlap.
    """

    objectives: str  # "TTFT p99 <= 2000 ms"
    unit: str  # users | req/s
    baseline: list[CapacityAnswer]
    candidate: list[CapacityAnswer]
    verdict: Verdict

    @staticmethod
    def span(answers: list[CapacityAnswer]) -> tuple[float, float]:
        """The union of a build's intervals: (lowest low, highest high); 0 and inf for none."""
        lows = [0.0 if a.low is None else a.low for a in answers]
        highs = [math.inf if a.high is None else a.high for a in answers]
        return min(lows), max(highs)


@dataclass
class Comparison:
    mode: str  # STORED | INTERLEAVED
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
    machine: MachineSpeed | None = None  # None: a build has no speed probe (schema 3 and older)
    capacity: CapacityPair | None = None  # both builds ran a capacity search with one objective

    @property
    def failed(self) -> bool:
        """A regression beyond its gate, or a capacity that certainly fell."""
        return bool(self.regressions) or (
            self.capacity is not None and self.capacity.verdict == "worse"
        )

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.regression]

    def counts(self) -> dict[str, int]:
        """How many rows improved, regressed (verdict worse) and did not change."""
        out = {"better": 0, "worse": 0, "~": 0}
        for row in self.rows:
            out[row.verdict] += 1
        return out
