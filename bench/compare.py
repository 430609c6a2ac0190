"""`python -m bench.compare`: did the candidate make serving faster or slower than the baseline?

    python -m bench.compare baseline=NAME|PATH candidate=PATH [report=DIR] [allow_mismatch=true]
    python -m bench.compare interleave.rounds=5 \\
        'interleave.common=[scenario=short_qa,target=bundled]' \\
        'interleave.candidate=[runtime.quantization=int8]' report=reports/int8

The run (one repeat of one load level) is the unit: per metric and level, Welch's t-test on the
logs of the per-run values gives the ratio candidate/baseline with its confidence interval,
Mann-Whitney U checks it, and Holm-Bonferroni adjusts every p-value of the report together. A
verdict needs both significance and an effect beyond the noise threshold. Per-request latency
quantiles get hierarchical bootstrap CIs (runs, then requests); peak memory is compared exactly
within a tolerance.

Interleaved mode runs both builds alternately on this machine (A B B A A B ...: alternating
which goes first cancels a linear drift), one repeat per round and side, then compares them:
on a shared machine that is far less noisy than a baseline stored on another day.

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

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.console import Console
from rich.table import Table

from bench import baseline as baselines
from bench import stats
from bench.comparison import (
    Comparison,
    Geomean,
    MemoryRow,
    Metric,
    QuantileRow,
    Row,
    Side,
)
from bench.environment import Machine, commits_behind, version_differences, versions
from bench.figures import Build
from bench.levels import Level, level_requests, levels_of, peak_memory, run_peaks
from bench.report import verdict_rule
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

    @functools.cached_property
    def levels(self) -> dict[Level, pd.DataFrame]:
        """The runs grouped by load level."""
        return levels_of(self.runs)


def load_side(label: str, source: str, run_dirs: Sequence[Path]) -> Loaded:
    from bench import store

    loaded = [store.load(d) for d in run_dirs]
    runs = pd.concat([x.runs for x in loaded], ignore_index=True)
    requests = pd.concat([x.requests for x in loaded], ignore_index=True)
    if runs.empty:
        raise CompareError(f"{label} ({source}) has no finished load level")
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
    return Loaded(side, runs, requests, machines, versions(*(e.environment for e in entries)))


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


def _test(
    where: str, metric: Metric, base: list[float], cand: list[float], warnings: list[str]
) -> stats.RatioTest | None:
    if not base or not cand:
        return None
    try:
        return stats.ratio_test(base, cand)
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
    for name, levels in (("baseline", base_levels), ("candidate", cand_levels)):
        other = cand_levels if name == "baseline" else base_levels
        for level in sorted(set(levels) - set(other), key=Level.sort_key):
            warnings.append(f"{level.name}: only in the {name}; not compared")
    common = sorted(set(base_levels) & set(cand_levels), key=Level.sort_key)
    if not common:
        raise CompareError(
            "the builds share no load level (same scenario, lengths and load); run the "
            "candidate with the baseline's scenario and overrides"
        )
    # (level, or None for load time; metric; per-run values of each side; their test)
    pending: list[tuple[Level | None, Metric, list[float], list[float], _Test]] = []
    for level in common:
        b, c = base_levels[level], cand_levels[level]
        if min(len(b), len(c)) < stats.MIN_REPEATS:
            warnings.append(
                f"{level.name}: {len(b)} baseline and {len(c)} candidate runs; a test needs "
                f"{stats.MIN_REPEATS} per side to be trusted (scenario.repeats)"
            )
        for metric in METRICS:
            bv, cv = _values(b, metric.column), _values(c, metric.column)
            pending.append((level, metric, bv, cv, _test(level.name, metric, bv, cv, warnings)))
        memory = _memory(level, b, c, warnings)
        if memory is not None:
            result.memory.append(memory)
        _quantiles(result, level, level_requests(base.requests, b),
                   level_requests(cand.requests, c))  # fmt: skip
    # Load time: one value per server start, not per level.
    bv = _values(base.runs.drop_duplicates("run_id"), LOAD_TIME.column)
    cv = _values(cand.runs.drop_duplicates("run_id"), LOAD_TIME.column)
    if bv and cv:
        load_test = _test("server start", LOAD_TIME, bv, cv, warnings)
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
                    f"{where} {metric.label}: Welch's test says {verdict} but Mann-Whitney "
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
    _warn(result, base, cand)
    return result


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
            mode = "interleaved"
        else:
            assert cfg.baseline is not None and cfg.candidate is not None
            base_dirs = baselines.run_dirs(cfg.baseline, root)
            cand_dirs = baselines.run_dirs(cfg.candidate, root)
            base_src, cand_src, mode = cfg.baseline, cfg.candidate, "stored baseline"
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
        paths = write_comparison_report(result, builds, Path(cfg.report))
        print(f"report: {paths['md']}")
    return EXIT_REGRESSION if result.regressions else 0


def _print(result: Comparison, console: Console | None = None) -> None:
    counts = result.counts()
    table = Table(
        title=f"{result.candidate.source} vs {result.baseline.source} ({result.mode}): "
        f"{counts['better']} better · {counts['worse']} worse · {counts['~']} unchanged",
        caption=f"{verdict_rule(result)}. Red: worse beyond its gate, so the comparison fails.",
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
            "" if math.isnan(row.p_adjusted) else f"{row.p_adjusted:.3g}", row.verdict,
            style=style,
        )  # fmt: skip
    print_whole(console or Console(), table)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
