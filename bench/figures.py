"""PNG figures of one build (a report) or several (an A/B comparison), from stored DataFrames.

Each public function draws one figure through a private `_*_figure` that returns the matplotlib
Figure, so tests can inspect what was drawn before it becomes pixels. Figures are built on
`matplotlib.figure.Figure` directly, never through pyplot: nothing is registered globally, so
nothing leaks and no display backend is touched.

Conventions shared by every figure:
- a build keeps one colour everywhere (its index in `builds`: blue, then orange, ...);
- latencies are in ms, drawn from successful requests only; failures are counted in the legend;
- a load level is bench.levels' `Level` (scenario, lengths, load), so levels line up across
  builds even when their level indices differ, and scenarios concatenated into one build are
  never pooled; a figure shows a level's statistics under the names and with the values the
  tables give them (bench/levels.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

from bench.diagnosis import level_windows
from bench.levels import (
    REQUEST_COLUMNS,
    RUN_COLUMNS,
    Level,
    LevelStats,
    PeakMemory,
    level_requests,
    level_stats,
    levels_of,
    steady,
)
from bench.levels import peak_memory as level_peak_memory
from bench.store import StoredRun
from bench.telemetry import KV_USAGE, PREEMPTIONS, RUNNING, WAITING

Floats = npt.NDArray[np.float64]

DPI = 120
WIDTH_IN = 7.5  # 900 px at DPI: the width of a PR comment
# Baseline blue, candidate orange (matplotlib's tab10 order), then more for n-way comparisons.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
_MARKERS = ("o", "s", "^", "D", "v", "P")
LOG_SPAN = 10.0  # an axis whose data span more than this ratio is drawn on a log scale

METRICS = {
    "ttft_ms": "TTFT",
    "e2e_ms": "E2E latency",
    "tpot_ms": "TPOT",
    "ttft_from_scheduled_ms": "TTFT from intended send",
    "e2e_from_scheduled_ms": "E2E from intended send",
}
# What the figures read: a level's statistics, and each run's own TTFT percentiles.
_RUN_COLUMNS = (*RUN_COLUMNS, "ttft_ms_p50", "ttft_ms_p99")


@dataclass(frozen=True, eq=False)  # eq=False: comparing DataFrames has no single truth value
class Build:
    label: str  # "baseline (abc123)", "candidate (int8)"
    runs: pd.DataFrame  # runs.parquet rows, possibly several runs or scenarios concatenated
    requests: pd.DataFrame  # requests.parquet rows

    def __post_init__(self) -> None:
        for name, frame, needed in (
            ("runs", self.runs, _RUN_COLUMNS),
            ("requests", self.requests, REQUEST_COLUMNS),
        ):
            missing = [c for c in needed if c not in frame.columns]
            if len(frame) and missing:
                raise ValueError(
                    f"build {self.label!r}: {name} lacks columns {missing}; pass the "
                    f"DataFrames of bench.store.load(run_dir).{name} (docs/metrics.md)"
                )


def colour(index: int) -> str:
    """The colour of the build at `index` in every figure."""
    return PALETTE[index % len(PALETTE)]


# ---- load levels -------------------------------------------------------------------------


def _by_level(build: Build) -> dict[Level, pd.DataFrame]:
    """A build's requests split by load level: those of the level's runs (bench.levels)."""
    return {lv: level_requests(build.requests, runs) for lv, runs in levels_of(build.runs).items()}


def _levels(builds: Iterable[Build]) -> list[Level]:
    found: set[Level] = set()
    for build in builds:
        found.update(levels_of(build.runs))
    return sorted(found, key=Level.sort_key)


def _titles(levels: Sequence[Level]) -> tuple[bool, bool]:
    """Whether titles must name the scenario (several) and the lengths (a sweep over them)."""
    scenarios = {lv.scenario for lv in levels}
    shapes = {(lv.scenario, lv.input_tokens, lv.output_tokens) for lv in levels}
    return len(scenarios) > 1, len(shapes) > len(scenarios)


def _title(level: Level, with_scenario: bool, with_lengths: bool, sep: str = " · ") -> str:
    """The level's load ("c=8"), with its lengths and scenario where others differ in them."""
    text = level.label if with_lengths else level.load
    return f"{level.scenario}{sep}{text}" if with_scenario else text


def _x_label(builds: Sequence[Build]) -> tuple[str, bool]:
    """(axis label, whether the axis is concurrency)."""
    levels = _levels(builds)
    open_loop = any(lv.request_rate is not None for lv in levels)
    closed_loop = any(lv.request_rate is None for lv in levels)
    if open_loop and closed_loop:
        return "concurrency (users) or request rate (req/s)", False
    if open_loop:
        return "request rate (req/s)", False
    return "concurrency (users)", True


# ---- values ------------------------------------------------------------------------------


def _ok(requests: pd.DataFrame) -> pd.DataFrame:
    kept = steady(requests)
    return kept[kept["ok"].astype(bool)]


def _values(requests: pd.DataFrame, metric: str) -> Floats:
    """A latency column over successful requests, nulls dropped."""
    column = _ok(requests)[metric].dropna()
    return np.asarray(column, dtype=np.float64)


def _itl(requests: pd.DataFrame) -> Floats:
    """Every successful request's per-token ITL values, pooled (docs/metrics.md: ITL)."""
    lists = [np.asarray(v, dtype=np.float64) for v in _ok(requests)["itl_ms"] if v is not None]
    return np.concatenate(lists) if lists else np.empty(0)


def _failures(builds: Sequence[Build]) -> list[str]:
    """Legend labels: the build's label, plus how many requests failed and are not drawn."""
    labels = []
    for b in builds:
        kept = steady(b.requests)
        failed = int((~kept["ok"].astype(bool)).sum()) if len(kept) else 0
        note = f" · {failed} of {len(kept)} failed, not drawn" if failed else ""
        labels.append(b.label + note)
    return labels


def _log_axis(ax: Axes, which: str, values: Iterable[float]) -> None:
    """A log scale labelled in plain numbers (2, 5, 10, 20, ...), never 3×10⁰.

    1-2-5 ticks while the data cover at most two decades, decades only beyond that, so that
    labels never run into each other at PR-comment width.
    """
    positive = [v for v in values if np.isfinite(v) and v > 0]
    decades = np.log10(max(positive) / min(positive)) if positive else 0.0
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.10g}"))
    axis.set_minor_formatter(NullFormatter())


def _spans(values: Iterable[float]) -> bool:
    """Whether positive values span more than LOG_SPAN: then a log axis reads better."""
    positive = [v for v in values if np.isfinite(v) and v > 0]
    return bool(positive) and max(positive) / min(positive) > LOG_SPAN


# ---- layout ------------------------------------------------------------------------------


def _check(builds: Sequence[Build]) -> None:
    if not builds:
        raise ValueError("no builds to draw: pass one Build (a report) or two (A/B)")
    labels = [b.label for b in builds]
    if len(set(labels)) != len(labels):
        raise ValueError(f"build labels must differ, got {labels}: the legends tell them apart")


def _figure(height_in: float) -> Figure:
    return Figure(figsize=(WIDTH_IN, height_in), layout="constrained")


def _grid(fig: Figure, n: int) -> list[Axes]:
    """n panels sharing both axes, two or three to a row; spare cells are removed."""
    ncols = 1 if n == 1 else 2 if n <= 4 else 3
    nrows = -(-n // ncols)
    fig.set_size_inches(WIDTH_IN, 0.8 + 2.4 * nrows)
    grid = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[n:]:
        ax.remove()
    for i, ax in enumerate(axes[:n]):
        # Axes labels only on the outer panels, where sharing makes them mean every panel.
        ax.tick_params(labelbottom=i >= n - ncols)
    return axes[:n]


def _note(ax: Axes, text: str) -> None:
    """A panel that says why it is empty instead of an empty frame."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _legend(fig: Figure, handles: Sequence[Any], labels: Sequence[str]) -> None:
    # Below the panels ("outside"), so it never covers data nor the title; constrained layout
    # makes room. As many columns as fit the figure's width (~100 characters at 10 pt),
    # since a wider legend would widen the saved image.
    widest = max(len(t) for t in labels) + 6  # the handle and the gaps take ~6 characters
    ncols = max(1, min(len(labels), 100 // widest))
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, frameon=False)


def _build_handles(builds: Sequence[Build]) -> list[Any]:
    return [Line2D([], [], color=colour(i), lw=2) for i in range(len(builds))]


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


# ---- latency CDF -------------------------------------------------------------------------


def _ecdf(values: Floats) -> tuple[Floats, Floats]:
    """Step coordinates of the empirical CDF: 0 before the smallest value, 1 at the largest."""
    x = np.sort(values)
    y = np.arange(1, len(x) + 1, dtype=np.float64) / len(x)
    return np.concatenate([x[:1], x]), np.concatenate([[0.0], y])


def _latency_cdf_figure(builds: Sequence[Build], metric: str) -> Figure:
    _check(builds)
    if metric not in METRICS:
        raise ValueError(f"unknown latency metric {metric!r}; expected one of {list(METRICS)}")
    name = METRICS[metric]
    levels = _levels(builds)
    fig = _figure(3.2)
    if not levels:
        _note(fig.subplots(), "no requests recorded")
        return fig
    scenarios, lengths = _titles(levels)
    axes = _grid(fig, len(levels))
    by_level = [_by_level(b) for b in builds]
    drawn: list[float] = []
    for ax, level in zip(axes, levels, strict=True):
        for i, b in enumerate(builds):
            rows = by_level[i].get(level)
            values = _values(rows, metric) if rows is not None else np.empty(0)
            if len(values) == 0:
                continue
            x, y = _ecdf(values)
            ax.step(x, y, where="post", color=colour(i), lw=1.6, label=b.label)
            drawn.extend((float(x.min()), float(x.max())))
        if not ax.lines:
            _note(ax, "no successful requests")
        ax.set_title(_title(level, scenarios, lengths), fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.02)
    if _spans(drawn):
        _log_axis(axes[0], "x", drawn)  # shared: every panel follows
    for ax in axes:
        if ax.xaxis.get_tick_params()["labelbottom"]:  # the bottom panel of each column
            ax.set_xlabel(f"{name} (ms)")
        spec = ax.get_subplotspec()
        if spec is not None and spec.is_first_col():
            ax.set_ylabel("fraction of requests")
    fig.suptitle(f"{name} CDF (successful requests)", fontsize=11)
    _legend(fig, _build_handles(builds), _failures(builds))
    return fig


def latency_cdf(builds: Sequence[Build], metric: str, path: Path) -> Path:
    """Empirical CDF of a latency (`ttft_ms`, `e2e_ms`, ...) per build, a panel per load level."""
    return _save(_latency_cdf_figure(builds, metric), path)


# ---- TTFT and throughput against load ----------------------------------------------------


def _latency_points(
    sweep: Sequence[LevelStats], runs: dict[Level, pd.DataFrame], q: str
) -> pd.DataFrame:
    """TTFT at percentile `q` ("p50", "p99") per level of a sweep (columns x, mid, lo, hi): the
    level's own, every request pooled, with the range of the runs' own as its bar."""
    rows = []
    for s in sweep:
        mid = getattr(s.ttft_ms, q)
        per_run = runs[s.level][f"ttft_ms_{q}"].astype(float).dropna()
        if mid is not None:
            lo = min(mid, per_run.min()) if len(per_run) else mid
            hi = max(mid, per_run.max()) if len(per_run) else mid
            rows.append({"x": s.level.x, "mid": mid, "lo": lo, "hi": hi})
    return pd.DataFrame(rows, columns=["x", "mid", "lo", "hi"])


def _throughput_points(sweep: Sequence[LevelStats]) -> pd.DataFrame:
    """out tok/s per level of a sweep (columns x, mid, lo, hi): the mean over repeats ± sd."""
    rows = [
        {"x": s.level.x, "mid": t.mean, "lo": t.mean - t.sd, "hi": t.mean + t.sd}
        for s in sweep
        if math.isfinite((t := s.output_throughput).mean)
    ]
    return pd.DataFrame(rows, columns=["x", "mid", "lo", "hi"])


def _errorbar(
    ax: Axes, points: pd.DataFrame, colour_: str, style: str, marker: str, dodge: float
) -> None:
    """Points `mid` with bars from `lo` to `hi`. x is scaled by 2**dodge (a fraction of a log2
    step) so that two builds' bars at one load stand apart; the tick stays at the measured
    load."""
    if points.empty:
        return
    mid = points["mid"].to_numpy(dtype=np.float64)
    err = np.vstack([mid - points["lo"].to_numpy(np.float64), points["hi"] - mid])
    ax.errorbar(
        points["x"].to_numpy(np.float64) * 2.0**dodge,
        mid,
        yerr=err,
        color=colour_,
        ls=style,
        marker=marker,
        ms=4,
        capsize=3,
        lw=1.5,
    )


def _load_ticks(ax: Axes, xs: Sequence[float], concurrency: bool) -> None:
    """Ticks at the measured loads only; powers of two on a log2 axis for concurrency."""
    if len(xs) > 1 and (concurrency or _spans(xs)):
        ax.set_xscale("log", base=2 if concurrency else 10)
    ax.xaxis.set_major_locator(FixedLocator(list(xs)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())


def _vs_concurrency_figure(builds: Sequence[Build]) -> Figure:
    _check(builds)
    fig = _figure(3.4)
    ax_ttft, ax_tput = fig.subplots(1, 2, sharex=True)
    x_label, concurrency = _x_label(builds)
    scenarios = sorted({lv.scenario for lv in _levels(builds)})
    markers = {s: _MARKERS[i % len(_MARKERS)] for i, s in enumerate(scenarios)}
    xs: set[float] = set()
    ttft_values: list[float] = []
    for i, b in enumerate(builds):
        dodge = (i - (len(builds) - 1) / 2) * 0.05
        runs = levels_of(b.runs)
        # One series per sweep: a lengths sweep at one load is never pooled.
        sweeps: dict[tuple[str, int, int, bool], list[LevelStats]] = {}
        for s in level_stats(b.runs, b.requests):
            sweeps.setdefault(s.level.sweep, []).append(s)
        for sweep in sweeps.values():
            marker = markers[sweep[0].level.scenario]
            for q, style in (("p50", "-"), ("p99", "--")):
                points = _latency_points(sweep, runs, q)
                _errorbar(ax_ttft, points, colour(i), style, marker, dodge)
                ttft_values.extend(points["lo"].tolist() + points["hi"].tolist())
            _errorbar(ax_tput, _throughput_points(sweep), colour(i), "-", marker, dodge)
            xs.update(s.level.x for s in sweep)
    if not xs:
        for ax in (ax_ttft, ax_tput):
            _note(ax, "no runs recorded")
    else:
        _load_ticks(ax_ttft, sorted(xs), concurrency)
    if _spans(ttft_values):
        _log_axis(ax_ttft, "y", ttft_values)
    ax_ttft.set_title("TTFT", fontsize=10)
    ax_ttft.set_ylabel("TTFT (ms)")
    ax_tput.set_title("output throughput", fontsize=10)
    ax_tput.set_ylabel("output throughput (tok/s)")
    ax_tput.set_ylim(bottom=0)
    for ax in (ax_ttft, ax_tput):
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    handles = _build_handles(builds)
    labels = [b.label for b in builds]
    handles += [Line2D([], [], color="0.3", ls="-"), Line2D([], [], color="0.3", ls="--")]
    labels += ["TTFT p50", "TTFT p99"]
    if len(scenarios) > 1:
        handles += [Line2D([], [], color="0.3", ls="", marker=markers[s]) for s in scenarios]
        labels += scenarios
    _legend(fig, handles, labels)
    fig.suptitle(
        "TTFT of every request, bars: the runs' own range · out tok/s: mean of repeats ± sd",
        fontsize=10,
    )
    return fig


def vs_concurrency(builds: Sequence[Build], path: Path) -> Path:
    """TTFT p50/p99 and output throughput against concurrency (or request rate)."""
    return _save(_vs_concurrency_figure(builds), path)


# ---- peak memory -------------------------------------------------------------------------


_MEMORY_KINDS = {"GPU": "GPU total (NVML)", "RSS": "server RSS"}


def peak_memory_bars(builds: Sequence[Build]) -> tuple[list[Level], list[list[PeakMemory | None]]]:
    """What the peak-memory figure draws: every level, and per build each level's "peak MiB"
    as every table shows it (bench.levels.peak_memory); None where a build lacks the level
    or measured no memory."""
    levels = _levels(builds)
    per_build = [levels_of(b.runs) for b in builds]
    return levels, [
        [level_peak_memory(runs[lv]) if lv in runs else None for lv in levels] for runs in per_build
    ]


def _peak_memory_figure(builds: Sequence[Build]) -> Figure:
    _check(builds)
    fig = _figure(3.0)
    ax = fig.subplots()
    levels, peaks = peak_memory_bars(builds)
    kinds = sorted({p.kind for row in peaks for p in row if p is not None})
    if not kinds:
        ax.set_axis_off()
        _note(ax, "no memory figures recorded")
        ax.set_title("peak memory", fontsize=10)
        return fig
    # Bars no wider than a quarter of a group, so one group of two bars does not fill the page.
    width = min(0.8 / len(builds), 0.25)
    for i, (b, row) in enumerate(zip(builds, peaks, strict=True)):
        offsets = np.arange(len(levels)) + (i - (len(builds) - 1) / 2) * width
        heights = [math.nan if p is None else p.mib for p in row]
        bars = ax.bar(offsets, heights, width * 0.9, color=colour(i), label=b.label)
        texts = ["" if p is None else f"{p.mib:,.0f}" for p in row]
        ax.bar_label(bars, labels=texts, fontsize=9, padding=2)
    scenarios, lengths = _titles(levels)
    ax.set_xticks(np.arange(len(levels)), [_title(lv, scenarios, lengths, "\n") for lv in levels])
    ax.set_xlim(-0.5, len(levels) - 0.5)
    ax.set_xlabel("load level")
    ax.set_ylabel("peak memory (MiB)")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.margins(y=0.12)  # room for the value labels above the bars
    ax.grid(axis="y", alpha=0.3)
    what = " or ".join(_MEMORY_KINDS[k] for k in kinds)
    ax.set_title(f"peak memory per level: the maximum over repeats of the {what}", fontsize=10)
    handles = [Patch(facecolor=colour(i)) for i in range(len(builds))]
    _legend(fig, handles, [b.label for b in builds])
    return fig


def peak_memory(builds: Sequence[Build], path: Path) -> Path:
    """Grouped bars of each level's peak memory per build: the GPU total, else the server's
    RSS, as the tables show it."""
    return _save(_peak_memory_figure(builds), path)


# ---- ITL ---------------------------------------------------------------------------------

_LOG_FLOOR_MS = 1e-3  # ITL can be 0 (two events read in one tick); a log axis cannot show 0


def _box_stats(values: Floats, label: str) -> dict[str, Any]:
    """Box p25–p75, line p50, whiskers p1–p99 (numpy's linear percentiles, as the harness)."""
    p1, p25, p50, p75, p99 = np.percentile(values, [1, 25, 50, 75, 99])
    return {
        "label": label,
        "whislo": float(p1),
        "q1": float(p25),
        "med": float(p50),
        "q3": float(p75),
        "whishi": float(p99),
        "fliers": [],
    }


def _itl_figure(builds: Sequence[Build]) -> Figure:
    _check(builds)
    levels = _levels(builds)
    scenarios, lengths = _titles(levels)
    fig = _figure(3.4)
    ax = fig.subplots()
    by_level = [_by_level(b) for b in builds]
    stats: list[tuple[int, int, dict[str, Any]]] = []  # (level index, build index, stats)
    for j, level in enumerate(levels):
        for i, b in enumerate(builds):
            rows = by_level[i].get(level)
            values = _itl(rows) if rows is not None else np.empty(0)
            if values.size:
                stats.append((j, i, _box_stats(values, b.label)))
    if not stats:
        ax.set_axis_off()
        _note(ax, "no ITL values recorded")
        return fig
    # Heavy tailed (p99 far above p50, as batching stalls make it): a log axis keeps the box.
    log = any(s["whishi"] > LOG_SPAN * max(s["med"], _LOG_FLOOR_MS) for _, _, s in stats)
    if log:
        for _, _, s in stats:
            for key in ("whislo", "q1", "med", "q3", "whishi"):
                s[key] = max(s[key], _LOG_FLOOR_MS)
        _log_axis(ax, "y", [s[k] for _, _, s in stats for k in ("whislo", "whishi")])
    width = 0.8 / len(builds)
    for j, i, s in stats:
        position = j + (i - (len(builds) - 1) / 2) * width
        c = colour(i)
        ax.bxp(
            [s],
            positions=[position],
            widths=width * 0.8,
            patch_artist=True,
            showfliers=False,
            boxprops={"facecolor": c, "alpha": 0.35, "edgecolor": c},
            medianprops={"color": c, "lw": 2},
            whiskerprops={"color": c},
            capprops={"color": c, "lw": 1.5},
        )
    # Scenario and load on two lines: side by side they run into the next level's label.
    ax.set_xticks(np.arange(len(levels)), [_title(lv, scenarios, lengths, "\n") for lv in levels])
    ax.set_xlim(-0.6, len(levels) - 0.4)
    ax.set_xlabel("load level")
    ax.set_ylabel("ITL (ms)" + (", log scale" if log else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("ITL per token: box p25–p75, line p50, whiskers p1–p99", fontsize=10)
    handles: list[Any] = [Patch(facecolor=colour(i), alpha=0.5) for i in range(len(builds))]
    _legend(fig, handles, _failures(builds))
    return fig


def itl_distribution(builds: Sequence[Build], path: Path) -> Path:
    """Pooled ITL of successful requests per build and load level, p50 and p99 marked."""
    return _save(_itl_figure(builds), path)


# ---- telemetry timeline ------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Trace:
    label: str
    t: Floats
    y: Floats
    colour: str
    style: str = "line"  # line; step: a gauge, held until the next scrape; marker: events


@dataclass(frozen=True)
class _Panel:
    label: str
    traces: list[_Trace]
    top: float | None = None  # a fixed top (percentages); None: the data's, with headroom


def _series(telemetry: pd.DataFrame, source: str, metric: str) -> tuple[Floats, Floats]:
    rows = telemetry[(telemetry["source"] == source) & (telemetry["metric"] == metric)]
    rows = rows.sort_values("t_s")
    return rows["t_s"].to_numpy(np.float64), rows["value"].to_numpy(np.float64)


def _kv_traces(telemetry: pd.DataFrame) -> list[_Trace]:
    """KV cache usage in percent, and a marker at 100% wherever the preemption counter rose."""
    traces = []
    for name in KV_USAGE:  # vLLM's current name, else its older one
        t, y = _series(telemetry, "server", name)
        if len(t):
            traces.append(_Trace("KV cache usage", t, y * 100, colour(2), "step"))
            break
    t, count = _series(telemetry, "server", PREEMPTIONS)
    rises = np.flatnonzero(np.diff(count) > 0) + 1
    traces.append(_Trace("preemption", t[rises], np.full(rises.size, 100.0), colour(3), "marker"))
    return traces


def _timeline_panels(telemetry: pd.DataFrame) -> list[_Panel]:
    """The panels that have samples, top to bottom, each with its traces that have some."""
    sources = {str(s) for s in telemetry["source"].unique()}
    gpus = sorted((s for s in sources if s.startswith("gpu")), key=lambda s: int(s[3:] or 0))

    def per_gpu(metric: str) -> list[_Trace]:
        return [_Trace(g, *_series(telemetry, g, metric), colour(i)) for i, g in enumerate(gpus)]

    memory = _Panel("GPU memory (MiB)", per_gpu("memory_used_mib"))
    if not any(len(tr.t) for tr in memory.traces):  # the CPU stand-in, as for peak memory
        rss = _series(telemetry, "process", "rss_mib")
        memory = _Panel("server RSS (MiB)", [_Trace("server RSS", *rss, colour(4))])
    server = [
        _Trace(name, *_series(telemetry, "server", metric), colour(i), "step")
        for i, (name, metric) in enumerate((("running", RUNNING), ("waiting", WAITING)))
    ]
    # One trace per client worker: "client" alone, or client0, client1, ... (client.workers).
    clients = sorted(s for s in sources if re.fullmatch(r"client\d*", s))
    lags = [
        _Trace(c, *_series(telemetry, c, "loop_lag_ms"), "0.3" if c == "client" else colour(i))
        for i, c in enumerate(clients)
    ]
    panels = [
        _Panel("GPU util (%)", per_gpu("gpu_util_pct"), top=105.0),
        memory,
        _Panel("requests", server),
        _Panel("KV cache (%)", _kv_traces(telemetry), top=110.0),
        _Panel("loop lag (ms)", lags),
    ]
    return [
        _Panel(p.label, [tr for tr in p.traces if len(tr.t)], p.top)
        for p in panels
        if any(len(tr.t) for tr in p.traces)
    ]


def _draw_panel(ax: Axes, panel: _Panel) -> None:
    for tr in panel.traces:
        if tr.style == "marker":
            ax.plot(tr.t, tr.y, ls="", marker="v", ms=6, color=tr.colour, label=tr.label)
        elif tr.style == "step":
            ax.step(tr.t, tr.y, where="post", color=tr.colour, lw=1.3, label=tr.label)
        else:
            ax.plot(tr.t, tr.y, color=tr.colour, lw=1.0, label=tr.label)
    # From zero, with headroom: a flat series (RSS, a pinned batch) stays clear of the frame.
    top = panel.top or 1.15 * max(float(tr.y.max()) for tr in panel.traces)
    ax.set_ylim(0, top if top > 0 else 1.0)
    ax.set_ylabel(panel.label, fontsize=9)
    ax.grid(alpha=0.3)
    if len(panel.traces) > 1:  # beside the panel, so it never covers the data
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def _timeline_figure(stored: StoredRun) -> Figure:
    run_ids = {str(r) for r in (*stored.runs["run_id"], *stored.telemetry["run_id"])}
    if len(run_ids) > 1:
        raise ValueError(
            f"a timeline shows one run, got {len(run_ids)} ({', '.join(sorted(run_ids))}): "
            "pass bench.store.load(run_dir)"
        )
    panels = _timeline_panels(stored.telemetry)
    fig = _figure(0.9 + 1.3 * max(len(panels), 1))
    if not panels:
        _note(fig.subplots(), "no telemetry recorded")
        return fig
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=True):
        _draw_panel(ax, panel)
    # The load levels: a band per repeat, labelled along the top with the level's label.
    windows = level_windows(stored.runs, stored.requests)
    scenarios, _ = _titles(list(windows))
    ticks: list[tuple[float, str]] = []
    for j, (level, spans) in enumerate(windows.items()):
        for w in spans:
            for ax in axes:
                ax.axvspan(w.start_s, w.end_s, color="0.5", alpha=0.10 if j % 2 else 0.20, lw=0)
            repeat = f" #{w.repeat + 1}" if len(spans) > 1 else ""
            ticks.append(((w.start_s + w.end_s) / 2, _title(level, scenarios, True) + repeat))
    if ticks:
        top = axes[0].secondary_xaxis("top")
        top.set_xticks([x for x, _ in ticks], [text for _, text in ticks], fontsize=8)
        top.tick_params(labelrotation=30 if len(ticks) > 4 else 0, length=0)
    axes[-1].set_xlabel("seconds from the run's start")
    fig.suptitle("Telemetry over the run; shaded: the load levels' windows", fontsize=10)
    return fig


def timeline(stored: StoredRun, path: Path) -> Path:
    """One run's telemetry on one time axis: GPU utilisation and memory (else the server's
    RSS), running and waiting requests, KV cache usage with preemptions, the client's loop
    lag; each load level's windows shaded and labelled."""
    return _save(_timeline_figure(stored), path)


# ---- all of them -------------------------------------------------------------------------


# ---- capacity frontier -------------------------------------------------------------------

_VERDICT_MARKERS = {"meets": "o", "uncertain": "s", "misses": "X"}


def _frontier_figure(searches: Sequence[tuple[str, Sequence[Mapping[str, Any]]]]) -> Figure:
    fig = _figure(4.2)
    ax = fig.subplots()
    plotted = False
    for i, (_, probes) in enumerate(searches):
        points = sorted(
            (
                (float(p["load"]), float(p["tokens_per_user"]), float(p["output_throughput"]), p)
                for p in probes
                if p.get("tokens_per_user") is not None
            ),
            key=lambda point: point[0],
        )
        if not points:
            continue
        plotted = True
        ax.plot([x for _, x, _, _ in points], [y for _, _, y, _ in points], color=colour(i), lw=1)
        for load, x, y, probe in points:
            marker = _VERDICT_MARKERS[str(probe["verdict"])]
            ax.scatter(x, y, color=colour(i), marker=marker, s=36, zorder=3)
            ax.annotate(f"{load:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if not plotted:
        _note(ax, "no probe completed a request with more than one token")
    ax.set_xlabel("tok/s per user (1000 / TPOT p50)")
    ax.set_ylabel("total output tok/s")
    ax.set_title("Throughput against per-user speed, each probe labelled with its load")
    handles = [Line2D([], [], color=colour(i), lw=2) for i in range(len(searches))]
    handles += [Line2D([], [], color="0.3", marker=m, ls="") for m in _VERDICT_MARKERS.values()]
    labels = [label for label, _ in searches] + [f"verdict: {v}" for v in _VERDICT_MARKERS]
    _legend(fig, handles, labels)
    return fig


def frontier(searches: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], path: Path) -> Path:
    """The throughput/latency frontier of capacity searches: total output tok/s against the
    tok/s one user sees, one point per probe (capacity.json's probes), per build."""
    return _save(_frontier_figure(searches), path)


# ---- groups: shared prefixes, conversations --------------------------------------------------


def _grouped(requests: pd.DataFrame) -> pd.DataFrame:
    """Successful requests that belong to a group (scenario.prefix_groups, a conversation of
    scenario.turns), TTFT known."""
    if "group_position" not in requests.columns or not len(requests):
        return requests.iloc[0:0]
    ok = _ok(requests)
    return ok[ok["group_position"].notna() & ok["ttft_ms"].notna()]


def has_groups(builds: Sequence[Build]) -> bool:
    """Whether any build's requests carry a position in a group (docs/metrics.md)."""
    return any(len(_grouped(b.requests)) for b in builds)


def ttft_by_position_points(requests: pd.DataFrame) -> pd.DataFrame:
    """TTFT p50 and p99 (ms) per position in group, pooled over groups, levels and repeats:
    columns position, p50, p99, n."""
    rows = [
        (
            int(cast(float, position)),
            *np.percentile(frame["ttft_ms"].to_numpy(np.float64), [50, 99]),
            len(frame),
        )
        for position, frame in _grouped(requests).groupby("group_position")
    ]
    return pd.DataFrame(rows, columns=["position", "p50", "p99", "n"])


def _ttft_by_position_figure(builds: Sequence[Build]) -> Figure:
    _check(builds)
    fig = _figure(3.4)
    ax = fig.subplots()
    values: list[float] = []
    positions: set[int] = set()
    for i, b in enumerate(builds):
        points = ttft_by_position_points(b.requests)
        for q, style in (("p50", "-"), ("p99", "--")):
            ax.plot(points["position"], points[q], style, color=colour(i), marker="o")
        values.extend(points["p50"].tolist() + points["p99"].tolist())
        positions.update(points["position"].tolist())
    if not positions:
        _note(ax, "no request belongs to a group")
    else:
        ax.xaxis.set_major_locator(FixedLocator(sorted(positions)))
    if _spans(values):
        _log_axis(ax, "y", values)
    ax.set_xlabel(
        "position in group / turn (0: a prefix's first request, a conversation's first turn)"
    )
    ax.set_ylabel("TTFT (ms)")
    ax.grid(alpha=0.3)
    handles = _build_handles(builds)
    handles += [Line2D([], [], color="0.3", ls="-"), Line2D([], [], color="0.3", ls="--")]
    _legend(fig, handles, [*_failures(builds), "TTFT p50", "TTFT p99"])
    fig.suptitle("TTFT by position in group (shared prefix) or turn (conversation)", fontsize=10)
    return fig


def ttft_by_group_position(builds: Sequence[Build], path: Path) -> Path:
    """TTFT p50/p99 against the request's position in its group: a shared prefix's, or a
    conversation's turn."""
    return _save(_ttft_by_position_figure(builds), path)


def all_figures(builds: Sequence[Build], out_dir: Path) -> dict[str, Path]:
    """Every figure as out_dir/<name>.png: ttft_cdf, e2e_cdf, vs_concurrency, peak_memory, itl,
    and ttft_by_group_position where requests belong to groups (shared prefixes, conversations)."""
    out_dir = Path(out_dir)
    figures = {
        "ttft_cdf": latency_cdf(builds, "ttft_ms", out_dir / "ttft_cdf.png"),
        "e2e_cdf": latency_cdf(builds, "e2e_ms", out_dir / "e2e_cdf.png"),
        "vs_concurrency": vs_concurrency(builds, out_dir / "vs_concurrency.png"),
        "peak_memory": peak_memory(builds, out_dir / "peak_memory.png"),
        "itl": itl_distribution(builds, out_dir / "itl.png"),
    }
    if has_groups(builds):
        path = out_dir / "ttft_by_group_position.png"
        figures["ttft_by_group_position"] = ttft_by_group_position(builds, path)
    return figures
