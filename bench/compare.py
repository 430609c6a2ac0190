"""`python -m bench.compare`: did the candidate make serving faster or slower than the baseline?

    python -m bench.compare baseline=NAME|PATH candidate=PATH [report=DIR] [allow_mismatch=true]
    python -m bench.compare interleave.rounds=5 \\
        'interleave.common=[scenario=short_qa,target=bundled]' \\
        'interleave.candidate=[runtime.quantization=int8]' report=reports/int8

Per metric and level the change is the ratio of the geometric means of the runs (one repeat of
one load level each), candidate/baseline, with its confidence interval. What it is tested
against depends on the mode. A stored baseline holds sessions (separate invocations of the
harness, bench/baseline.py), whose repeats share the machine's state: the candidate's session
mean is tested against the spread of the baseline's session means (with one session a side, a
default spread, bench/stats.py). Interleaved mode alternates the builds within one invocation,
so Welch's t-test on the per-run values serves, with Mann-Whitney U as a check.
Holm-Bonferroni adjusts every p-value of the report together. A verdict needs both
significance and an effect beyond the noise threshold. Per-request latency
quantiles get hierarchical bootstrap CIs (runs, then requests); peak memory is compared exactly
within a tolerance.

Interleaved mode runs both builds alternately on this machine (A B B A A B ...: alternating
which goes first cancels a linear drift), one repeat per round and side, then compares them:
on a shared machine that is far less noisy than a baseline stored on another day, since
whatever moves the machine moves both builds.

Builds compare only when they ran the same workload and model on one machine: the machine in
each run's fingerprint (bench/environment.py) must show no difference that moves speed (CPU
model, ISA, cores, memory, GPUs with their power limits and clocks). A run recorded without a
machine identity is refused too. Differing driver or package versions are a warning.

Exit codes: 0 no regression; 1 a metric regressed beyond its gate; 2 the comparison could not
be made (bad arguments, missing runs, incomparable builds).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.table import Table

from bench import baseline as baselines
from bench import capacity, stats, store
from bench.comparison import (
    INTERLEAVED,
    STORED,
    CapacityAnswer,
    CapacityPair,
    Comparison,
    Geomean,
    MachineSpeed,
    MemoryRow,
    Metric,
    ProbeFigure,
    QuantileRow,
    Row,
    Side,
)
from bench.diagnosis import diagnose
from bench.environment import Machine, commits_behind, version_differences, versions
from bench.figures import Build
from bench.levels import Level, level_requests, levels_of, peak_memory, run_peaks
from bench.probe import FIGURES, Session, change, sessions_of
from bench.report import capacity_line, drift_rule, probe_cells, verdict_rule
from bench.summary import print_whole

EXIT_REGRESSION, EXIT_UNUSABLE = 1, 2

METRICS = (
    Metric("output_throughput", "out tok/s", "tok/s", higher_is_better=True),
    Metric("request_throughput", "req/s", "req/s", higher_is_better=True),
    Metric("ttft_ms_p50", "TTFT p50", "ms", higher_is_better=False),
    Metric("ttft_ms_p99", "TTFT p99", "ms", higher_is_better=False),
    Metric("tpot_ms_p50", "TPOT p50", "ms", higher_is_better=False),
    Metric("tpot_ms_p99", "TPOT p99", "ms", higher_is_better=False),
    Metric("itl_ms_p50", "ITL p50", "ms", higher_is_better=False),
    Metric("itl_ms_p99", "ITL p99", "ms", higher_is_better=False),
    Metric("e2e_ms_p50", "E2E p50", "ms", higher_is_better=False),
    Metric("e2e_ms_p99", "E2E p99", "ms", higher_is_better=False),
)
LOAD_TIME = Metric("load_time_s", "load time", "s", higher_is_better=False, over="server starts")
QUANTILES = (("ttft_ms", 0.5), ("ttft_ms", 0.99), ("e2e_ms", 0.5), ("e2e_ms", 0.99))
# Peak memory is deterministic up to allocator noise: beyond this it changed.
MEMORY_TOLERANCE = 0.02
# Repeats of one build whose peak memory spreads wider than this disagree: say so.
MEMORY_SPREAD = 0.05


@dataclass
class InterleaveConfig:
    rounds: int = 0  # 0: compare stored results; N: run both builds N times each, alternately
    common: list[str] = field(default_factory=list)  # `python -m bench` overrides for both
    baseline: list[str] = field(default_factory=list)  # overrides for the baseline only
    candidate: list[str] = field(default_factory=list)  # overrides for the candidate only
    results_dir: str = "results/ab"


@dataclass
class CompareConfig:
    baseline: str | None = None  # a baseline name (results/baselines/NAME) or a path of runs
    candidate: str | None = None  # a path: a run directory or a directory of runs
    report: str | None = None  # where report.md, report.html and figures go
    allow_mismatch: bool = False  # compare builds whose workload/model/machine differ anyway
    alpha: float = 0.05
    threshold: float = 0.05  # effects within +-5% are noise, whatever the p-value
    gate: dict[str, float] = field(default_factory=dict)  # per-metric regression threshold
    baselines_dir: str = "results/baselines"
    interleave: InterleaveConfig = field(default_factory=InterleaveConfig)


class CompareError(Exception):
    """The comparison cannot be made; the message says why and what to do."""


@dataclass(frozen=True)
class Loaded:
    side: Side
    runs: pd.DataFrame
    requests: pd.DataFrame
    machines: tuple[Machine | None, ...] = ()  # per run directory; None: recorded without one
    versions: dict[str, str] = field(default_factory=dict)  # software: "2.5.1+cpu" or "a / b"
    telemetry: pd.DataFrame = field(default_factory=pd.DataFrame)  # what bench.diagnose reads

    @functools.cached_property
    def levels(self) -> dict[Level, pd.DataFrame]:
        """The runs grouped by load level."""
        return levels_of(self.runs)

    @functools.cached_property
    def capacities(self) -> dict[str, dict[str, Any]]:
        """capacity.json of each run directory that searched capacity, by its name (the run
        id of its rows)."""
        found = ((Path(d).name, capacity.read(Path(d))) for d in self.side.run_dirs)
        return {name: saved for name, saved in found if saved is not None}


def load_side(label: str, source: str, run_dirs: Sequence[Path]) -> Loaded:
    loaded = [store.load(d) for d in run_dirs]
    runs = pd.concat([x.runs for x in loaded], ignore_index=True)
    requests = pd.concat([x.requests for x in loaded], ignore_index=True)
    telemetry = pd.concat([x.telemetry for x in loaded], ignore_index=True)
    if runs.empty:
        raise CompareError(f"{label} ({source}) has no finished load level")
    # Each run directory is one session, and its runs' run_id is the session's id.
    entries = [baselines.entry_of(x.runs, d) for x, d in zip(loaded, run_dirs, strict=True)]
    side = Side(
        label=label,
        source=source,
        run_dirs=[str(d) for d in run_dirs],
        model=", ".join(sorted({e.model for e in entries})),
        target_kind=", ".join(sorted({e.target_kind for e in entries})),
        engine=", ".join(sorted({e.engine for e in entries} - {""})),
        kernels=", ".join(sorted({e.kernels for e in entries} - {""})),
        git_commit=entries[0].git_commit,
        git_dirty=any(bool(e.git_dirty) for e in entries),
        hardware_key=", ".join(sorted({e.hardware_key for e in entries})),
        started_at=min(e.started_at for e in entries),
    )
    machines = tuple(e.machine for e in entries)
    software = versions(*(e.environment for e in entries))
    result = Loaded(side, runs, requests, machines, software, telemetry)
    sessions = max(frame["run_id"].nunique() for frame in result.levels.values())
    return dataclasses.replace(result, side=dataclasses.replace(side, sessions=sessions))


def with_commits_behind(base: Loaded, cand: Loaded, repo_dir: Path) -> Loaded:
    """The baseline with how many commits it is behind the candidate in `repo_dir`'s history."""
    behind = commits_behind(repo_dir, base.side.git_commit, cand.side.git_commit)
    side = dataclasses.replace(base.side, commits_behind=behind)
    return dataclasses.replace(base, side=side)


def mismatches(base: Loaded, cand: Loaded) -> list[str]:
    """What makes the two builds incomparable: different work, model or machine."""
    found = []
    for scenario in sorted(set(base.runs["scenario"]) & set(cand.runs["scenario"])):
        hashes = [
            set(side.runs.loc[side.runs["scenario"] == scenario, "workload_hash"])
            for side in (base, cand)
        ]
        if hashes[0] != hashes[1]:
            found.append(
                f"workload of {scenario}: baseline {_short(hashes[0])}, candidate "
                f"{_short(hashes[1])} (different prompts, lengths, seed or endpoint)"
            )
    if base.side.model != cand.side.model:
        found.append(f"model: baseline {base.side.model!r}, candidate {cand.side.model!r}")
    return found + _machine_mismatches(base, cand)


def _machine_mismatches(base: Loaded, cand: Loaded) -> list[str]:
    """How the machines differ: between the sides, or between the runs of one side; a run
    without a machine identity cannot show that it ran on the other side's machine."""
    found: list[str] = []
    machines = []
    for loaded in (base, cand):
        if not loaded.machines or None in loaded.machines:
            found.append(_unidentified(loaded.side))
            continue
        first, *others = [m for m in loaded.machines if m is not None]
        for other in others:
            for difference in first.differences(other):
                item = f"machine: {difference} (between the {loaded.side.label}'s runs)"
                if item not in found:
                    found.append(item)
        machines.append(first)
    if len(machines) == 2:
        differences = machines[0].differences(machines[1])
        found += [f"machine: {d} (baseline vs candidate)" for d in differences]
    return found


def _unidentified(side: Side) -> str:
    if side.label == "baseline":
        name = side.source if "/" not in side.source else "NAME"
        again = f"record it again on this machine: make baseline / baseline.save={name}"
    else:
        again = "run it again on this machine"
    return (
        f"{side.label} {side.source} was recorded without a machine identity (by a harness "
        "that did not record the CPU ISA, cores, memory and GPU clocks), so nothing shows it "
        f"ran on the {'candidate' if side.label == 'baseline' else 'baseline'}'s machine; "
        f"{again}"
    )


def _short(hashes: set[str]) -> str:
    return "/".join(sorted(h[:12] for h in hashes))


def _values(frame: pd.DataFrame, column: str) -> list[float]:
    return [float(v) for v in frame[column] if v is not None and not pd.isna(v)]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


_Test = stats.RatioTest | None


def _geomean(values: Sequence[float]) -> float:
    """The value a row shows for a side; nan where it has none, or one <= 0 (not tested)."""
    try:
        return stats.geomean(values)
    except ValueError:
        return math.nan


def _by_session(frame: pd.DataFrame, column: str) -> list[list[float]]:
    """A metric's per-run values grouped by session (run_id), in the order they appear."""
    return [_values(group, column) for _, group in frame.groupby("run_id", sort=False)]


def _test(
    where: str, metric: Metric, frames: tuple[pd.DataFrame, pd.DataFrame], per_run: bool,
    warnings: list[str],
) -> stats.RatioTest | None:  # fmt: skip
    """The metric's test: Welch's on per-run values (per_run), else the session test."""
    base, cand = (_values(f, metric.column) for f in frames)
    if not base or not cand:
        return None
    try:
        if per_run:
            return stats.ratio_test(base, cand)
        default = stats.SESSION_SD_DEFAULTS[stats.session_sd_family(metric.column)]
        b, c = (_by_session(f, metric.column) for f in frames)
        return stats.session_ratio_test(b, c, default)
    except ValueError as exc:
        warnings.append(f"{where} {metric.label}: not tested ({exc})")
        return None


def _per_run(requests: pd.DataFrame, column: str) -> list[list[float]]:
    """A latency of the successful requests, grouped by run (run_id, repeat)."""
    ok = requests[requests["ok"] & requests[column].notna()]
    return [list(map(float, g[column])) for _, g in ok.groupby(["run_id", "repeat"])]


def _memory(
    level: Level, base: pd.DataFrame, cand: pd.DataFrame, warnings: list[str]
) -> MemoryRow | None:
    """The level's peak memory of both builds (the console's and the report's "peak MiB")."""
    b, c = peak_memory(base), peak_memory(cand)
    if b is None or c is None:
        return None
    if b.kind != c.kind:
        warnings.append(
            f"{level.name}: peak memory not compared: the baseline measured {b.kind}, the "
            f"candidate {c.kind}"
        )
        return None
    delta = c.mib / b.mib - 1.0
    verdict: stats.Verdict = "~"
    if abs(delta) > MEMORY_TOLERANCE:
        verdict = "worse" if delta > 0 else "better"
    return MemoryRow(
        level=level,
        kind=b.kind,
        baseline_mib=b.mib,
        candidate_mib=c.mib,
        delta_pct=delta * 100.0,
        verdict=verdict,
    )


def compare(
    base: Loaded,
    cand: Loaded,
    mode: str,
    alpha: float = 0.05,
    threshold: float = 0.05,
    gate: dict[str, float] | None = None,
    allowed_mismatches: Sequence[str] = (),
) -> Comparison:
    gate = gate or {}
    unknown = set(gate) - {m.column for m in (*METRICS, LOAD_TIME)}
    if unknown:
        allowed = ", ".join(m.column for m in (*METRICS, LOAD_TIME))
        raise CompareError(f"gate: unknown metrics {sorted(unknown)}; expected some of {allowed}")
    result = Comparison(mode, base.side, cand.side, alpha, threshold,
                        mismatches=list(allowed_mismatches))  # fmt: skip
    warnings = result.warnings
    if result.mismatches:
        warnings.append("compared with allow_mismatch=true: " + "; ".join(result.mismatches))
    base_levels, cand_levels = base.levels, cand.levels
    searched = _searched(base) | _searched(cand)
    probes = 0  # a search's loads depend on what it measured: one-sided ones are expected
    for name, levels in (("baseline", base_levels), ("candidate", cand_levels)):
        other = cand_levels if name == "baseline" else base_levels
        for level in sorted(set(levels) - set(other), key=Level.sort_key):
            if level.scenario in searched:
                probes += 1
            else:
                warnings.append(f"{level.name}: only in the {name}; not compared")
    if probes:
        warnings.append(
            f"{probes} capacity probes at loads only one build measured are not compared level "
            "by level; the capacity line compares the searches"
        )
    common = sorted(set(base_levels) & set(cand_levels), key=Level.sort_key)
    # Interleaved builds share the machine's moves, round by round: runs are the samples. A
    # stored baseline's sessions each had the machine in its own state: sessions are.
    per_run = mode == INTERLEAVED
    if not common:
        raise CompareError(
            "the builds share no load level (same scenario, lengths and load); run the "
            "candidate with the baseline's scenario and overrides"
        )
    # (level, or None for load time; metric; per-run values of each side; their test)
    pending: list[tuple[Level | None, Metric, list[float], list[float], _Test]] = []
    for level in common:
        b, c = base_levels[level], cand_levels[level]
        sessions = b["run_id"].nunique() + c["run_id"].nunique()
        if (per_run or sessions < 3) and min(len(b), len(c)) < stats.MIN_REPEATS:
            warnings.append(
                f"{level.name}: {len(b)} baseline and {len(c)} candidate runs; a test needs "
                f"{stats.MIN_REPEATS} per side to be trusted (scenario.repeats)"
            )
        for metric in METRICS:
            bv, cv = _values(b, metric.column), _values(c, metric.column)
            test = _test(level.name, metric, (b, c), per_run, warnings)
            pending.append((level, metric, bv, cv, test))
        memory = _memory(level, b, c, warnings)
        if memory is not None:
            result.memory.append(memory)
        _quantiles(result, level, level_requests(base.requests, b),
                   level_requests(cand.requests, c))  # fmt: skip
    # Load time: one value per server start, not per level.
    starts = (base.runs.drop_duplicates("run_id"), cand.runs.drop_duplicates("run_id"))
    bv, cv = (_values(f, LOAD_TIME.column) for f in starts)
    if bv and cv:
        load_test = _test("server start", LOAD_TIME, starts, per_run, warnings)
        pending.append((None, LOAD_TIME, bv, cv, load_test))
    p_values = [
        t.p_welch if t is not None else math.nan for _, _, _, _, t in pending
    ]  # holm passes nan through
    adjusted = stats.holm(p_values)
    for (at, metric, bv, cv, test), p_adj in zip(pending, adjusted, strict=True):
        verdict: stats.Verdict = "~"
        if test is not None:
            verdict = stats.verdict(test, p_adj, metric.higher_is_better, threshold, alpha)
            if verdict != "~" and test.p_mannwhitney is not None and test.p_mannwhitney >= alpha:
                where = "server start" if at is None else at.name
                warnings.append(
                    f"{where} {metric.label}: the t-test says {verdict} but Mann-Whitney "
                    f"does not (p={test.p_mannwhitney:.3f}); outliers may drive it"
                )
        limit = gate.get(metric.column, threshold)
        regression = verdict == "worse" and test is not None and abs(test.ratio - 1.0) > limit
        result.rows.append(
            Row(
                level=at,
                metric=metric,
                baseline=bv,
                candidate=cv,
                baseline_geomean=_geomean(bv),
                candidate_geomean=_geomean(cv),
                test=test,
                p_adjusted=p_adj,
                verdict=verdict,
                gate=limit,
                regression=regression,
            )
        )
    for metric in (*METRICS, LOAD_TIME):
        ratios = [r.test.ratio for r in result.rows if r.metric == metric and r.test is not None]
        if ratios:
            result.geomeans.append(Geomean(metric, stats.geomean(ratios)))
    _warn_few_samples(result)
    _warn_few_sessions(result)
    _warn(result, base, cand)
    _within_machine_drift(result, sessions_of(base.runs), sessions_of(cand.runs))
    result.capacity = _capacity(base, cand, result.warnings)
    return result


def _searched(loaded: Loaded) -> set[str]:
    """The scenarios a build ran as capacity searches (their run directories hold
    capacity.json)."""
    return set(loaded.runs.loc[loaded.runs["run_id"].isin(loaded.capacities), "scenario"])


def _answers(loaded: Loaded) -> list[tuple[str, str, CapacityAnswer]]:
    """(objectives, unit, answer) of each run directory of a build that searched capacity."""
    return [
        (
            " and ".join(saved["objectives"]),
            str(saved["unit"]),
            CapacityAnswer(saved["capacity"], saved["low"], saved["high"]),
        )
        for saved in loaded.capacities.values()
    ]


def _capacity(base: Loaded, cand: Loaded, warnings: list[str]) -> CapacityPair | None:
    """The builds' capacity searches side by side, where both ran one with the same objectives."""
    found = _answers(base), _answers(cand)
    if not found[0] or not found[1]:
        return None
    kinds = {(objectives, unit) for side in found for objectives, unit, _ in side}
    if len(kinds) > 1:
        named = "; ".join(f"{o} over {u}" for o, u in sorted(kinds))
        warnings.append(f"capacity searched against different objectives ({named}); not compared")
        return None
    [(objectives, unit)] = kinds
    b, c = ([a for _, _, a in side] for side in found)
    (b_low, b_high), (c_low, c_high) = CapacityPair.span(b), CapacityPair.span(c)
    verdict: stats.Verdict = "better" if c_low > b_high else "worse" if c_high < b_low else "~"
    return CapacityPair(objectives, unit, b, c, verdict)


def _warn_few_sessions(result: Comparison) -> None:
    """Say when a session test's spread rests on so few sessions that its interval is wide."""
    counts = {t.sessions for r in result.rows if (t := r.test) and t.sessions}
    few = sorted(k for k in counts if 3 <= sum(k) < 5)
    if few:
        b, c = few[0]
        result.warnings.append(
            f"the spread between sessions rests on {b} baseline and {c} candidate sessions "
            f"({b + c - 2} degrees of freedom), so its intervals are wide; keep more sessions "
            "(baseline.keep, saving again) or compare interleaved (interleave.rounds=N)"
        )


def _warn_few_samples(result: Comparison) -> None:
    """One warning per quantile whose pooled samples are too few to bracket it."""
    for q, needed in stats.MIN_QUANTILE_SAMPLES.items():
        short = [r for r in result.quantiles if r.q == q and min(r.samples) < needed]
        if short:
            fewest = min(min(r.samples) for r in short)
            result.warnings.append(
                f"p{q * 100:g} rests on too few requests in {len(short)} of the per-request "
                f"quantile rows (as few as {fewest} per side; {needed} are needed to bracket "
                "it): its CI is wide and the estimate near the sample maximum. Raise "
                "scenario.num_requests or scenario.repeats"
            )


def _quantiles(result: Comparison, level: Level, b_req: pd.DataFrame, c_req: pd.DataFrame) -> None:
    for column, q in QUANTILES:
        b_runs, c_runs = _per_run(b_req, column), _per_run(c_req, column)
        n = (sum(map(len, b_runs)), sum(map(len, c_runs)))
        if not min(n):
            continue
        try:
            ratio, low, high = stats.bootstrap_quantile_ratio(b_runs, c_runs, q)
        except ValueError as exc:
            result.warnings.append(f"{level.name} {column} p{q * 100:g}: no CI ({exc})")
            continue
        bq = float(np.quantile(np.concatenate(b_runs), q))
        cq = float(np.quantile(np.concatenate(c_runs), q))
        result.quantiles.append(QuantileRow(level, column, q, bq, cq, ratio, low, high, n))


def _warn(result: Comparison, base: Loaded, cand: Loaded) -> None:
    differ = version_differences(base.versions, cand.versions)
    if differ:
        result.warnings.append(
            "software versions differ (baseline vs candidate), so a change may come from them "
            "rather than from the build: " + "; ".join(differ)
        )
    for loaded in (base, cand):
        failed = int((~loaded.requests["ok"]).sum())
        if failed:
            result.warnings.append(
                f"{loaded.side.label}: {failed} of {len(loaded.requests)} requests failed; "
                "latencies cover successful requests only (see success_rate)"
            )
    for loaded in (base, cand):
        for level, frame in loaded.levels.items():
            measured = run_peaks(frame)
            peaks = [] if measured is None else measured[1]
            if len(peaks) > 1 and (max(peaks) - min(peaks)) / _median(peaks) > MEMORY_SPREAD:
                result.warnings.append(
                    f"{loaded.side.label} {level.name}: peak memory differs by more than "
                    f"{MEMORY_SPREAD:.0%} between repeats ({min(peaks):,.0f}-{max(peaks):,.0f} "
                    "MiB)"
                )


def _machine_speed(base: Sequence[Session], cand: Sequence[Session]) -> MachineSpeed | None:
    """What the speed probes saw of the machine during each build's sessions; None where a
    build has no probe. The figures that gate are those of the part the engine runs on (the
    GPU where both builds probed one, else the CPU) and the client's event loop.

    A part's change is the one all its figures agree on, the smallest of theirs: when the
    machine's speed changes (other work on its cores, another clock), every figure of the part
    moves, while a moment's disturbance of one timing moves that figure alone."""
    sides = [[p for s in sessions for p in s.probes] for sessions in (base, cand)]
    if not all(sides):
        return None
    engine = "GPU" if all(any(p.gpu_gemm_tflops for p in probes) for probes in sides) else "CPU"
    figures: list[ProbeFigure] = []
    # Per comparison (between the builds, during each build's sessions): part -> its changes.
    between: dict[str, list[tuple[float, str]]] = {}
    within: list[dict[str, list[tuple[float, str]]]] = [{}, {}]
    for f in FIGURES:
        values = [[v for p in probes if (v := p.value(f)) is not None] for probes in sides]
        if not all(values):
            continue
        b, c = (statistics.median(v) for v in values)
        gates = f.part in (engine, "client")
        figures.append(ProbeFigure(f.label, f.unit, f.higher_is_better, b, c, gates))
        if not gates:
            continue
        between.setdefault(f.part, []).append((change(b, c), f.label))
        for i, sessions in enumerate((base, cand)):
            before = [v for s in sessions if s.before and (v := s.before.value(f)) is not None]
            after = [v for s in sessions if s.after and (v := s.after.value(f)) is not None]
            if before and after:
                moved = change(statistics.median(before), statistics.median(after))
                within[i].setdefault(f.part, []).append((moved, f.label))
    if not between:
        return None
    moves = [
        _agreed(between, "between the builds"),
        _agreed(within[0], "during the baseline's sessions"),
        _agreed(within[1], "during the candidate's sessions"),
    ]
    return MachineSpeed(
        figures=figures,
        between=moves[0][0],
        within=(moves[1][0], moves[2][0]),
        sessions=(len(base), len(cand)),
        cause=max(moves)[1],
    )


def _agreed(by_part: dict[str, list[tuple[float, str]]], when: str) -> tuple[float, str]:
    """The largest change that all figures of one part agree on, and what moved (`when`)."""
    agreed = [
        (min(moved for moved, _ in changes), f"{' and '.join(f for _, f in changes)} {when}")
        for changes in by_part.values()
    ]
    return max(agreed, default=(0.0, ""))


def _within_machine_drift(
    result: Comparison, base: Sequence[Session], cand: Sequence[Session]
) -> None:
    """Take the verdict from every row whose change cannot be told from the machine's.

    The machine's speed may differ between the builds' sessions, and move during them, by
    `drift` (MachineSpeed): a change the build made is then known only to within that factor.
    A row keeps its verdict only where its whole interval (its ratio, without one) lies beyond
    the drift, [1 / (1 + drift), 1 + drift]; the others become "~", with a note and no
    regression. A build without probes (recorded by an older harness) leaves the rows as they
    are, with a warning.
    """
    result.machine = speed = _machine_speed(base, cand)
    if result.mode == INTERLEAVED:
        return  # the builds alternate in one invocation: the machine's moves reach both alike
    if speed is None:
        missing = [n for n, s in (("baseline", base), ("candidate", cand)) if not any(
            x.probes for x in s)]  # fmt: skip
        result.warnings.append(
            f"no machine speed probe in the {' and '.join(missing) or 'builds'} (recorded by a "
            "harness before schema 4), so a change of the machine's own speed between the "
            "sessions cannot be told from the build's: record it again, or compare interleaved"
        )
        return
    band = 1.0 + speed.drift
    moved = f"the machine's speed changed by {speed.drift:.1%} ({speed.cause})"
    note = f"{moved}, so this change cannot be told from it"
    held: list[Row] = []
    for i, row in enumerate(result.rows):
        t = row.test
        if row.verdict == "~" or t is None:
            continue
        low, high = (t.ci_low, t.ci_high) if math.isfinite(t.ci_low + t.ci_high) else (
            t.ratio, t.ratio)  # fmt: skip
        if low > band or high < 1.0 / band:
            continue
        held.append(row)
        result.rows[i] = dataclasses.replace(row, verdict="~", regression=False, note=note)
    if held:
        worse = sum(r.verdict == "worse" for r in held)
        result.warnings.append(
            f"{len(held)} significant change{'s' * (len(held) != 1)} ({worse} worse) got no "
            f"verdict: {moved} by the speed probe, and their intervals reach into that. "
            "Compare interleaved "
            "(interleave.rounds=N) so that both builds share the machine's moves"
        )


def _interleave(cfg: InterleaveConfig) -> tuple[list[Path], list[Path]]:
    """Run both builds `rounds` times, alternating which goes first; their run directories."""
    from bench.compose import compose
    from bench.runner import run

    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    root = Path(cfg.results_dir) / stamp
    repeats = [] if any(o.startswith("scenario.repeats=") for o in cfg.common) else [
        "scenario.repeats=1"
    ]  # fmt: skip
    dirs: dict[str, list[Path]] = {"baseline": [], "candidate": []}
    order = ("baseline", "candidate")
    for i in range(cfg.rounds):
        for name in order if i % 2 == 0 else order[::-1]:
            own = cfg.baseline if name == "baseline" else cfg.candidate
            print(f"round {i + 1}/{cfg.rounds}: {name} ({' '.join(own) or 'no overrides'})")
            overrides = [*repeats, *cfg.common, *own, f"results_dir={root / name}"]
            result = run(compose(*overrides))
            if result.status != "complete":
                raise CompareError(f"round {i + 1}, {name}: the run is partial ({result.reason})")
            dirs[name].append(result.run_dir)
    return dirs["baseline"], dirs["candidate"]


def _config(argv: Sequence[str]) -> CompareConfig:
    schema = OmegaConf.structured(CompareConfig)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.from_dotlist(list(argv)))
    except OmegaConfBaseException as exc:
        allowed = ", ".join(CompareConfig.__dataclass_fields__)
        raise CompareError(f"{exc}\nkeys: {allowed}, interleave.*") from exc
    cfg: CompareConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if cfg.interleave.rounds == 0 and (cfg.baseline is None or cfg.candidate is None):
        raise CompareError(
            "give baseline=NAME|PATH and candidate=PATH, or interleave.rounds=N with "
            "interleave.common/baseline/candidate overrides (see --help)"
        )
    if cfg.interleave.rounds < 0 or not 0 < cfg.alpha < 1 or cfg.threshold < 0:
        raise CompareError("interleave.rounds >= 0, 0 < alpha < 1 and threshold >= 0 expected")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    from bench.runner import REPO_DIR  # the checkout whose commits the runs record

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        cfg = _config(argv)
        root = Path(cfg.baselines_dir)
        if cfg.interleave.rounds:
            base_dirs, cand_dirs = _interleave(cfg.interleave)
            base_src = " ".join(cfg.interleave.baseline) or "as configured"
            cand_src = " ".join(cfg.interleave.candidate) or "as configured"
            mode = INTERLEAVED
        else:
            assert cfg.baseline is not None and cfg.candidate is not None
            base_dirs = baselines.run_dirs(cfg.baseline, root)
            cand_dirs = baselines.run_dirs(cfg.candidate, root)
            base_src, cand_src, mode = cfg.baseline, cfg.candidate, STORED
        base = load_side("baseline", base_src, base_dirs)
        cand = load_side("candidate", cand_src, cand_dirs)
        base = with_commits_behind(base, cand, REPO_DIR)
        found = mismatches(base, cand)
        if found and not cfg.allow_mismatch:
            raise CompareError(
                "the builds are not comparable:\n  - " + "\n  - ".join(found) + "\ncompare "
                "builds that ran the same workload and model on one machine (run the candidate "
                "like the baseline, on the baseline's machine, or record the baseline again on "
                "this one), or pass allow_mismatch=true to compare anyway (the report then says "
                "so at its top)"
            )
        result = compare(base, cand, mode, cfg.alpha, cfg.threshold, cfg.gate, found)
    except (CompareError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    _print(result)
    if cfg.report:
        from bench.report import write_comparison_report

        sides = (base, cand)
        labels = [x.side.label + (f" ({x.side.engine})" if x.side.engine else "") for x in sides]
        builds = [Build(lb, x.runs, x.requests) for lb, x in zip(labels, sides, strict=True)]
        candidate = store.StoredRun(cand.requests, cand.runs, cand.telemetry)
        paths = write_comparison_report(result, builds, Path(cfg.report), diagnose(candidate))
        print(f"report: {paths['md']}")
    return EXIT_REGRESSION if result.failed else 0


def _print(result: Comparison, console: Console | None = None) -> None:
    counts = result.counts()
    drift = drift_rule(result)
    table = Table(
        title=f"{result.candidate.source} vs {result.baseline.source} ({result.mode}): "
        f"{counts['better']} better · {counts['worse']} worse · {counts['~']} unchanged",
        caption=f"{verdict_rule(result)}{'; ' + drift if drift else ''}. Red: worse beyond its "
        "gate, so the comparison fails.",
    )
    for column in ("level", "metric", "baseline", "candidate", "delta [CI]", "p (adj.)", "verdict"):
        table.add_column(column, justify="left" if column in ("level", "metric") else "right")
    for row in result.rows:
        t = row.test
        ci = (
            ""
            if t is None or math.isnan(t.ci_low)
            else f" [{(t.ci_low - 1) * 100:+.1f}, {(t.ci_high - 1) * 100:+.1f}]"
        )
        arrow = "↑" if row.metric.higher_is_better else "↓"
        style = "red" if row.regression else "green" if row.verdict == "better" else ""
        table.add_row(
            row.where, f"{arrow} {row.metric.name}", f"{row.baseline_geomean:,.4g}",
            f"{row.candidate_geomean:,.4g}", f"{row.delta_pct:+.1f}%{ci}",
            "" if math.isnan(row.p_adjusted) else f"{row.p_adjusted:.3g}",
            row.verdict + ("*" if row.note else ""), style=style,
        )  # fmt: skip
    console = console or Console()
    print_whole(console, table)
    if result.machine is not None:
        probe = Table(title="machine speed (probe)", caption=probe_cells(result.machine)[2])
        for column in ("figure", "baseline", "candidate", "ratio"):
            probe.add_column(column, justify="left" if column == "figure" else "right")
        for f in result.machine.figures:
            arrow = "↑" if f.higher_is_better else "↓"
            probe.add_row(f"{arrow} {f.label} {f.unit}", f"{f.baseline:,.4g}",
                          f"{f.candidate:,.4g}", f"×{f.ratio:.3f}")  # fmt: skip
        print_whole(console, probe)
    if result.capacity is not None:
        print(capacity_line(result.capacity))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
