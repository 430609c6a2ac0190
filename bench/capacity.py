"""Capacity search: the highest load that meets every objective set under slo.*, with an interval.

The load is concurrency (closed loop, `scenario.search=concurrency`) or request rate (open
loop, `search=rate`). From the scenario's own load the search grows by `capacity.growth` until
a probe misses an objective, then bisects between the highest load that met and the lowest
that missed: to one user, or to `capacity.rate_precision` of the rate. A probe is a load level
measured in rounds (one round is one repeat of the level: `scenario.num_requests` requests, in
closed loop at least `capacity.requests_per_user` per user); every probe gets
`scenario.repeats` rounds.

Judging. An objective such as "TTFT p99 ≤ 2000 ms" holds when at most 1% of requests are
slower than 2000 ms; a failed request is slower than every bound (it never delivered), and
`slo.success=0.99` allows 1% of requests to fail. So each objective asks what share of
requests misses it, and its Clopper-Pearson interval at `capacity.confidence` says whether the
probe certainly meets it (the interval lies within the allowed share), certainly misses it
(above it), or is uncertain. Rounds that disagree more than binomial sampling explains widen
the interval by their dispersion (quasi-binomial). The search follows each probe's point
estimate (the measured share); a probe that certainly meets a p99 objective holds at least
`bench.stats.min_samples_for_quantile(0.99)` = 368 requests, the harness's sample-size rule.

Settling. Once the bisection has closed, the probes on either side of the boundary get more
rounds until their verdict is certain or they hold twice the requests that rule asks for; a
verdict that flips reopens the search. Where one stays uncertain, the next probe out is
settled instead. The capacity is the highest load whose point estimate meets every objective
below the lowest that misses one; its interval runs from the highest load that certainly meets
to below the lowest that certainly misses: the loads the data cannot settle.

Latency in open loop is measured from each request's scheduled send time, so a client that
falls behind cannot hide queueing. Results are assumed monotone in the load; a probe that
contradicts that is named in the notes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import stats as sps

from bench.config import BenchConfig, CapacityConfig, LoadLevel, ScenarioConfig, SloConfig
from bench.records import RequestRecord, RunRecord
from bench.stats import min_samples_for_quantile

FILE_NAME = "capacity.json"
Verdict = Literal["meets", "misses", "uncertain"]
# search=rate with a first rate that already misses: halve it at most this many times.
_MAX_SHRINKS = 6
_NAMES = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "e2e_ms": "E2E"}


@dataclass(frozen=True)
class Objective:
    label: str  # what it judges: "TTFT p99", "success"
    name: str  # the whole objective: "TTFT p99 ≤ 2000 ms", "success ≥ 99.0%"
    metric: str  # ttft_ms | tpot_ms | e2e_ms | success
    bound: float  # ms; for success the least share that must succeed
    allowed: float  # the share of requests that may miss it

    def misses(self, r: RequestRecord, open_loop: bool) -> bool:
        if not r.ok:
            return True
        if self.metric == "success":
            return False
        value = self.value(r, open_loop)
        return value is not None and value > self.bound  # too short for a TPOT: cannot miss

    def value(self, r: RequestRecord, open_loop: bool) -> float | None:
        if open_loop and self.metric in ("ttft_ms", "e2e_ms"):
            return r.ttft_from_scheduled_ms if self.metric == "ttft_ms" else r.e2e_from_scheduled_ms
        return getattr(r, self.metric)  # type: ignore[no-any-return]


def objectives(slo: SloConfig) -> list[Objective]:
    q = slo.percentile / 100.0
    out = [
        Objective(label, f"{label} ≤ {bound:g} ms", m, bound, 1.0 - q)
        for m, bound in slo.latency_bounds.items()
        if (label := f"{_NAMES[m]} p{slo.percentile:g}")
    ]
    if slo.success is not None:
        out.append(
            Objective(
                "success", f"success ≥ {slo.success:.1%}", "success", slo.success, 1 - slo.success
            )
        )
    return out


@dataclass(frozen=True)
class Judgement:
    """One objective at one probe."""

    objective: str  # its name
    label: str  # what it judges, for table columns: "TTFT p99"
    value: float | None  # the percentile of the successful requests (ms), or the success share
    misses: int  # requests that missed the objective, over every round
    requests: int
    share: float  # misses / requests
    share_low: float  # its interval at the search's confidence
    share_high: float
    allowed: float
    verdict: Verdict

    @property
    def point_meets(self) -> bool:
        return self.share <= self.allowed


def miss_interval(
    misses: Sequence[int], sizes: Sequence[int], confidence: float
) -> tuple[float, float]:
    """Clopper-Pearson interval of the share of misses pooled over rounds; rounds that vary
    more than binomial sampling explains shrink the effective sample by their dispersion."""
    k, n = float(sum(misses)), float(sum(sizes))
    share = k / n
    dispersion = 1.0
    if len(sizes) >= 2 and 0.0 < share < 1.0:
        chi2 = sum(
            (m - s * share) ** 2 / (s * share * (1 - share))
            for m, s in zip(misses, sizes, strict=True)
        )
        dispersion = max(1.0, chi2 / (len(sizes) - 1))
    k, n = k / dispersion, n / dispersion
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else float(sps.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(sps.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def judge(
    objective: Objective,
    rounds: Sequence[Sequence[RequestRecord]],
    open_loop: bool,
    confidence: float,
) -> Judgement:
    misses = [sum(objective.misses(r, open_loop) for r in rnd) for rnd in rounds]
    sizes = [len(rnd) for rnd in rounds]
    requests = [r for rnd in rounds for r in rnd]
    n = sum(sizes)
    low, high = miss_interval(misses, sizes, confidence)
    verdict: Verdict = (
        "meets"
        if high <= objective.allowed
        else "misses"
        if low > objective.allowed
        else "uncertain"
    )
    if objective.metric == "success":
        value: float | None = sum(r.ok for r in requests) / n
    else:
        values = [v for r in requests if r.ok and (v := objective.value(r, open_loop)) is not None]
        q = 100.0 * (1.0 - objective.allowed)
        value = float(np.percentile(values, q)) if values else None
    return Judgement(
        objective.name,
        objective.label,
        value,
        sum(misses),
        n,
        sum(misses) / n,
        low,
        high,
        objective.allowed,
        verdict,
    )


@dataclass
class Probe:
    """A load and its rounds so far."""

    load: float
    level: int  # the level index of its rows in runs.parquet and requests.parquet
    rounds: list[list[RequestRecord]] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)
    judgements: list[Judgement] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(len(r) for r in self.rounds)

    @property
    def meets(self) -> bool:
        """The point estimate: every objective's measured share within what it allows."""
        return all(j.point_meets for j in self.judgements)

    @property
    def verdict(self) -> Verdict:
        verdicts = {j.verdict for j in self.judgements}
        if "misses" in verdicts:
            return "misses"
        return "meets" if verdicts == {"meets"} else "uncertain"

    def summary(self) -> dict[str, object]:
        """The probe as capacity.json records it."""
        tpot = [r.tpot_ms for rnd in self.rounds for r in rnd if r.ok and r.tpot_ms]
        goodput = [r.goodput for r in self.runs if r.goodput is not None]
        return {
            "load": self.load,
            "level": self.level,
            "rounds": len(self.rounds),
            "requests": self.requests,
            "verdict": self.verdict,
            "meets": self.meets,
            "objectives": [asdict(j) for j in self.judgements],
            "goodput": float(np.mean(goodput)) if goodput else None,
            "output_throughput": float(np.mean([r.output_throughput for r in self.runs])),
            # The rate one user sees while streaming: the x axis of a throughput/latency frontier.
            "tokens_per_user": 1000.0 / float(np.median(tpot)) if tpot else None,
        }


@dataclass(frozen=True)
class Capacity:
    dimension: str  # concurrency | rate
    objectives: list[str]
    confidence: float
    capacity: float | None  # None: even the lowest load tried misses
    # The interval: from the highest load that certainly meets (None: none does) to the
    # highest below the lowest that certainly misses (for rates, that one; None: no bound).
    low: float | None
    high: float | None
    first_miss: float | None  # the lowest load above the capacity that certainly misses
    complete: bool  # False while searching, or when the run stopped early
    probes: list[dict[str, object]]
    notes: list[str]

    @property
    def unit(self) -> str:
        return "users" if self.dimension == "concurrency" else "req/s"

    def text(self) -> str:
        """One line for the console and reports."""
        head = f"Capacity at {' and '.join(self.objectives)}"
        if self.capacity is None:
            lowest = min(float(p["load"]) for p in self.probes)  # type: ignore[arg-type]
            return f"{head}: none: the lowest load tried ({_load(lowest, self.dimension)}) misses"
        answer = _load(self.capacity, self.dimension)
        if self.high is None:
            return f"{head}: at least {answer}, the highest load tried (capacity.max_load)"
        if self.low == self.capacity == self.high:
            above = _load(self.capacity + 1, self.dimension)
            return f"{head}: {answer} (exact: {above} certainly misses)"
        low = "0" if self.low is None else f"{self.low:g}"
        span = f"{low}-{_load(self.high, self.dimension)}"
        meets = "nothing tried" if self.low is None else f"{self.low:g}"
        misses = "nothing tried" if self.first_miss is None else f"{self.first_miss:g}"
        return (
            f"{head}: {answer} (interval {span}: {meets} certainly meets, {misses} certainly "
            "misses, the verdicts between are uncertain)"
        )


def _load(value: float, dimension: str) -> str:
    if dimension == "concurrency":
        users = int(value)
        return f"{users} user{'s' * (users != 1)}"
    return f"{value:g} req/s"


class Search:
    """Chooses the next load to measure from every round so far (see the module docstring)."""

    def __init__(self, scenario: ScenarioConfig, slo: SloConfig, cfg: CapacityConfig) -> None:
        assert scenario.search is not None
        self.scenario, self.cfg = scenario, cfg
        self.dimension = scenario.search
        self.objectives = objectives(slo)
        self.open_loop = self.dimension == "rate"
        start = scenario.request_rate[0] if scenario.request_rate else scenario.concurrency[0]
        self.start = float(start)
        strictest = max(1.0 - o.allowed for o in self.objectives)
        self.settled_requests = 2 * min_samples_for_quantile(strictest, cfg.confidence)
        self.probes: dict[float, Probe] = {}

    # ---- measuring ----------------------------------------------------------------------

    def level(self, load: float) -> LoadLevel:
        """The load level of a load: a new index for a new load, in the order first measured."""
        index = self.probes[load].level if load in self.probes else len(self.probes)
        n_in, n_out = self.scenario.input_tokens[0], self.scenario.output_tokens[0]
        if self.open_loop:
            return LoadLevel(index, n_in, n_out, self.scenario.max_concurrency, load)
        return LoadLevel(index, n_in, n_out, int(load), None)

    def round_size(self, load: float) -> int:
        n = self.scenario.num_requests
        return n if self.open_loop else max(n, self.cfg.requests_per_user * int(load))

    def rounds(self, load: float) -> int:
        return len(self.probes[load].rounds) if load in self.probes else 0

    def add_round(self, load: float, requests: list[RequestRecord], run: RunRecord) -> None:
        probe = self.probes.setdefault(load, Probe(load, len(self.probes)))
        probe.rounds.append(requests)
        probe.runs.append(run)
        probe.judgements = [
            judge(o, probe.rounds, self.open_loop, self.cfg.confidence) for o in self.objectives
        ]

    def probe_line(self, load: float) -> str:
        """A probe's state in a few words, for the progress log."""
        probe = self.probes[load]
        parts = [
            f"{j.label} {_value(j)} ({j.misses}/{j.requests} missed)" for j in probe.judgements
        ]
        verdict: str = probe.verdict
        if verdict == "uncertain":
            verdict += f", {'meets' if probe.meets else 'misses'} by the estimate"
        return f"{', '.join(parts)}: {verdict}"

    # ---- choosing ------------------------------------------------------------------------

    def _bracket(self) -> tuple[Probe | None, Probe | None]:
        """(lo, hi): the highest load that met below the lowest that missed (point estimates)."""
        probes = sorted(self.probes.values(), key=lambda p: p.load)
        missed = [p for p in probes if not p.meets]
        hi = missed[0] if missed else None
        met = [p for p in probes if p.meets and (hi is None or p.load < hi.load)]
        return (met[-1] if met else None), hi

    def _between(self, lo: float, hi: float) -> float | None:
        """A load strictly between lo and hi, or None once they are as close as the search goes."""
        if self.dimension == "concurrency":
            return float((int(lo) + int(hi)) // 2) if hi - lo > 1 else None
        if hi / lo <= 1.0 + self.cfg.rate_precision:
            return None
        return _round_rate(math.sqrt(lo * hi))

    def _up(self, load: float) -> float | None:
        if load >= self.cfg.max_load:
            return None
        grown = load * self.cfg.growth
        if self.dimension == "concurrency":
            return min(float(max(load + 1, math.ceil(grown))), math.floor(self.cfg.max_load))
        return min(_round_rate(grown), self.cfg.max_load)

    def _down(self, load: float) -> float | None:
        if self.dimension == "concurrency":
            return None if load <= 1 else float(max(1, math.floor(load / self.cfg.growth)))
        if load < self.start / self.cfg.growth ** (_MAX_SHRINKS - 1):
            return None
        return _round_rate(load / self.cfg.growth)

    def next_load(self) -> float | None:
        """The load of the next round, or None when the search is over."""
        if not self.probes:
            return self.start
        latest = max(self.probes.values(), key=lambda p: p.level)
        if len(latest.rounds) < self.scenario.repeats:
            return latest.load
        lo, hi = self._bracket()
        if hi is None:  # everything so far met: grow
            assert lo is not None
            return self._up(lo.load) or self._settle(lo, None)
        if lo is None:  # everything so far missed: shrink
            return self._down(hi.load) or self._settle(None, hi)
        return self._between(lo.load, hi.load) or self._settle(lo, hi)

    def _settle(self, lo: Probe | None, hi: Probe | None) -> float | None:
        """More rounds at the probes beside the boundary, outward from it, until one on each
        side is certain; a probe that holds the most requests a probe gets and is still
        uncertain passes the question to the next one out (a new load where none is left)."""
        ordered = sorted(self.probes.values(), key=lambda p: p.load)
        if hi is not None:
            above = [p for p in ordered if p.load >= hi.load and not p.meets]
            certain, again = self._side(above, "misses")
            load = again or self._new(self._up(ordered[-1].load))
            if not certain and load is not None:
                return load
        if lo is not None:
            below = [p for p in ordered[::-1] if p.load <= lo.load and p.meets]
            certain, again = self._side(below, "meets")
            load = again or self._new(self._down(ordered[0].load))
            if not certain and load is not None:
                return load
        return None

    def _side(self, outward: list[Probe], wanted: Verdict) -> tuple[bool, float | None]:
        """Whether a probe on one side of the boundary is certain, and else the nearest one
        that can take another round (None when every one holds the most a probe gets)."""
        for probe in outward:
            if probe.verdict == wanted:
                return True, None
            if probe.requests < self.settled_requests:
                return False, probe.load
        return False, None

    def _new(self, load: float | None) -> float | None:
        return None if load is None or load in self.probes else load

    # ---- the answer ---------------------------------------------------------------------

    def result(self, complete: bool) -> Capacity:
        lo, hi = self._bracket()
        probes = sorted(self.probes.values(), key=lambda p: p.load)
        capacity = None if lo is None else lo.load
        certain_meets = [
            p.load
            for p in probes
            if p.verdict == "meets" and (capacity is None or p.load <= capacity)
        ]
        certain_misses = [
            p.load
            for p in probes
            if p.verdict == "misses" and (capacity is None or p.load > capacity)
        ]
        low = certain_meets[-1] if certain_meets else None
        high: float | None
        if hi is None:
            high = None
        elif certain_misses:
            high = certain_misses[0] - 1 if self.dimension == "concurrency" else certain_misses[0]
        else:
            high = probes[-1].load
        notes = []
        if hi is not None:
            above = [p.load for p in probes if p.meets and p.load > hi.load]
            if above:
                loads = ", ".join(_load(x, self.dimension) for x in above)
                notes.append(
                    f"not monotone: {loads} met the objectives above "
                    f"{_load(hi.load, self.dimension)}, which missed; the capacity is the "
                    "boundary below the first miss"
                )
        return Capacity(
            dimension=self.dimension,
            objectives=[o.name for o in self.objectives],
            confidence=self.cfg.confidence,
            capacity=capacity,
            low=low,
            high=high,
            first_miss=certain_misses[0] if certain_misses else None,
            complete=complete,
            probes=[p.summary() for p in probes],
            notes=notes,
        )


def _value(j: Judgement) -> str:
    if j.value is None:
        return "-"
    return f"{j.value:.1%}" if j.label == "success" else f"{j.value:,.1f} ms"


def _round_rate(value: float) -> float:
    """Rates to three significant figures, so that each level's label reads as what it is."""
    return float(f"{value:.3g}")


def write(capacity: Capacity, run_dir: Path) -> Path:
    """capacity.json beside the run's Parquet files, replaced atomically after every round."""
    path = run_dir / FILE_NAME
    body = {**asdict(capacity), "unit": capacity.unit, "text": capacity.text()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read(run_dir: Path) -> dict[str, Any] | None:
    """A run's capacity.json, or None for a run that did not search."""
    path = Path(run_dir) / FILE_NAME
    if not path.is_file():
        return None
    saved: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return saved


def search_for(cfg: BenchConfig) -> Search:
    return Search(cfg.scenario, cfg.slo, cfg.capacity)
