"""PNG figures of one build (a report) or several (an A/B comparison), from stored DataFrames.

Each public function draws one figure through a private `_*_figure` that returns the matplotlib
Figure, so tests can inspect what was drawn before it becomes pixels. Figures are built on
`matplotlib.figure.Figure` directly, never through pyplot: nothing is registered globally, so
nothing leaks and no display backend is touched.

Conventions shared by every figure:
- a build keeps one colour everywhere (its index in `builds`: blue, then orange, ...);
- latencies are in ms, drawn from successful requests only; failures are counted in the legend;
- a load level is (scenario, concurrency, request rate), so levels line up across builds even
  when their level indices differ, and scenarios concatenated into one build are never pooled.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
_REQUEST_COLUMNS = (
    "run_id", "level", "scenario", "concurrency", "request_rate", "ok", "ttft_ms", "e2e_ms",
    "itl_ms",
)  # fmt: skip
_RUN_COLUMNS = (
    "run_id",
    "level",
    "input_tokens",
    "output_tokens",
    "scenario",
    "repeat",
    "concurrency",
    "request_rate",
    "output_throughput",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "peak_gpu_memory_mib",
    "peak_rss_mib",
)


@dataclass(frozen=True, eq=False)  # eq=False: comparing DataFrames has no single truth value
class Build:
    label: str  # "baseline (abc123)", "candidate (int8)"
    runs: pd.DataFrame  # runs.parquet rows, possibly several runs or scenarios concatenated
    requests: pd.DataFrame  # requests.parquet rows

    def __post_init__(self) -> None:
        for name, frame, needed in (
            ("runs", self.runs, _RUN_COLUMNS),
            ("requests", self.requests, _REQUEST_COLUMNS),
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


@dataclass(frozen=True)
class _Load:
    scenario: str
    concurrency: int | None  # closed loop: users; open loop: in-flight cap
    request_rate: float | None  # None = closed loop
    lengths: tuple[int, int]  # the level's input and output tokens (a sweep over lengths)

    def sort_key(self) -> tuple[str, int, float, float, tuple[int, int]]:
        return (
            self.scenario,
            0 if self.request_rate is None else 1,
            self.request_rate or 0.0,
            float(self.concurrency or 0),
            self.lengths,
        )

    def title(self, with_scenario: bool, with_lengths: bool, sep: str = " · ") -> str:
        if self.request_rate is None:
            load = f"c={self.concurrency}"
        else:
            cap = f" (≤{self.concurrency})" if self.concurrency is not None else ""
            load = f"{self.request_rate:g} req/s{cap}"
        if with_lengths:
            load = f"{self.lengths[0]}/{self.lengths[1]} {load}"
        return f"{self.scenario}{sep}{load}" if with_scenario else load


def _null(value: Any) -> bool:
    return value is None or bool(pd.isna(value))


def _by_load(build: Build) -> dict[_Load, pd.DataFrame]:
    """A build's requests split by load level. They join their runs on (run_id, level) for the
    level's lengths: a request's own vary around them (range_ratio), and one scenario may sweep
    lengths at a single load. Nulls are keys too: open loop has no concurrency."""
    if build.requests.empty:
        return {}
    lengths = build.runs[["run_id", "level", "input_tokens", "output_tokens"]]
    lengths = lengths.drop_duplicates(["run_id", "level"]).rename(
        columns={"input_tokens": "level_input", "output_tokens": "level_output"}
    )
    frame = build.requests.merge(lengths, on=["run_id", "level"], how="left")
    out: dict[_Load, pd.DataFrame] = {}
    keys = ["scenario", "concurrency", "request_rate", "level_input", "level_output"]
    for key, rows in frame.groupby(keys, dropna=False, sort=False):
        scenario, conc, rate, n_in, n_out = cast(tuple[Any, ...], key)
        load = _Load(
            str(scenario),
            None if _null(conc) else int(conc),
            None if _null(rate) else float(rate),
            (0 if _null(n_in) else int(n_in), 0 if _null(n_out) else int(n_out)),
        )
        out[load] = rows
    return out


def _loads(builds: Iterable[Build]) -> list[_Load]:
    found: set[_Load] = set()
    for build in builds:
        found.update(_by_load(build))
    return sorted(found, key=_Load.sort_key)


def _titles(loads: Sequence[_Load]) -> tuple[bool, bool]:
    """Whether titles must name the scenario (several) and the lengths (a sweep over them)."""
    scenarios = {load.scenario for load in loads}
    lengths = len({(load.scenario, load.lengths) for load in loads}) > len(scenarios)
    return len(scenarios) > 1, lengths


def _x_of(runs: pd.DataFrame) -> pd.Series[float]:
    """The load axis: request rate for open-loop rows, concurrency for closed-loop ones."""
    return runs["request_rate"].astype(float).fillna(runs["concurrency"].astype(float))


def _x_label(builds: Sequence[Build]) -> tuple[str, bool]:
    """(axis label, whether the axis is concurrency)."""
    rates = [b.runs["request_rate"].notna() for b in builds if not b.runs.empty]
    open_loop = any(bool(r.any()) for r in rates)
    closed_loop = any(not bool(r.all()) for r in rates)
    if open_loop and closed_loop:
        return "concurrency (users) or request rate (req/s)", False
    if open_loop:
        return "request rate (req/s)", False
    return "concurrency (users)", True


# ---- values ------------------------------------------------------------------------------


def _ok(requests: pd.DataFrame) -> pd.DataFrame:
    return requests[requests["ok"].astype(bool)]


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
        failed = int((~b.requests["ok"].astype(bool)).sum()) if len(b.requests) else 0
        note = f" · {failed} of {len(b.requests)} failed, not drawn" if failed else ""
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
    loads = _loads(builds)
    fig = _figure(3.2)
    if not loads:
        _note(fig.subplots(), "no requests recorded")
        return fig
    scenarios, lengths = _titles(loads)
    axes = _grid(fig, len(loads))
    drawn: list[float] = []
    for ax, load in zip(axes, loads, strict=True):
        for i, b in enumerate(builds):
            rows = _by_load(b).get(load)
            values = _values(rows, metric) if rows is not None else np.empty(0)
            if len(values) == 0:
                continue
            x, y = _ecdf(values)
            ax.step(x, y, where="post", color=colour(i), lw=1.6, label=b.label)
            drawn.extend((float(x.min()), float(x.max())))
        if not ax.lines:
            _note(ax, "no successful requests")
        ax.set_title(load.title(scenarios, lengths), fontsize=10)
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


def _over_repeats(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per load value x: the median over repeats and their min and max (columns x, mid, lo, hi).

    Each repeat is one independent measurement of the level, so the spread of repeats is what
    the error bar shows; latency percentiles are never pooled here.
    """
    frame = pd.DataFrame({"x": _x_of(runs), "v": runs[column].astype(float)}).dropna()
    grouped = frame.groupby("x")["v"]
    return pd.DataFrame(
        {"mid": grouped.median(), "lo": grouped.min(), "hi": grouped.max()}
    ).reset_index()


def _errorbar(
    ax: Axes, points: pd.DataFrame, colour_: str, style: str, marker: str, dodge: float
) -> None:
    """Median with min-max bars. x is scaled by 2**dodge (a fraction of a log2 step) so that
    two builds' bars at one load stand apart; the tick stays at the measured load."""
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
    scenarios = sorted({str(s) for b in builds for s in b.runs.get("scenario", [])})
    markers = {s: _MARKERS[i % len(_MARKERS)] for i, s in enumerate(scenarios)}
    xs: set[float] = set()
    ttft_values: list[float] = []
    for i, b in enumerate(builds):
        if b.runs.empty:
            continue
        dodge = (i - (len(builds) - 1) / 2) * 0.05
        # One series per scenario and lengths: a lengths sweep at one load is never pooled.
        keys = ["scenario", "input_tokens", "output_tokens"]
        for (scenario, _, _), runs in b.runs.groupby(keys, sort=True):
            marker = markers[str(scenario)]
            for column, style in (("ttft_ms_p50", "-"), ("ttft_ms_p99", "--")):
                points = _over_repeats(runs, column)
                _errorbar(ax_ttft, points, colour(i), style, marker, dodge)
                ttft_values.extend(points["lo"].tolist() + points["hi"].tolist())
            points = _over_repeats(runs, "output_throughput")
            _errorbar(ax_tput, points, colour(i), "-", marker, dodge)
            xs.update(float(x) for x in _x_of(runs).dropna())
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
    fig.suptitle("median over repeats, bars min–max", fontsize=10)
    return fig


def vs_concurrency(builds: Sequence[Build], path: Path) -> Path:
    """TTFT p50/p99 and output throughput against concurrency (or request rate)."""
    return _save(_vs_concurrency_figure(builds), path)


# ---- peak memory -------------------------------------------------------------------------


def _peak_gpu(runs: pd.DataFrame) -> Floats:
    """Peak used memory per GPU index over every level and repeat (empty without NVML)."""
    lists = [np.asarray(v, dtype=np.float64) for v in runs.get("peak_gpu_memory_mib", [])]
    lists = [v for v in lists if v.size]
    if not lists:
        return np.empty(0)
    width = max(len(v) for v in lists)
    padded = np.full((len(lists), width), np.nan)
    for row, v in zip(padded, lists, strict=True):
        row[: len(v)] = v
    return np.asarray(np.nanmax(padded, axis=0), dtype=np.float64)


def _peak_rss(runs: pd.DataFrame) -> float | None:
    values = runs["peak_rss_mib"].dropna() if "peak_rss_mib" in runs else pd.Series([])
    return float(values.max()) if len(values) else None


def _peak_memory_figure(builds: Sequence[Build]) -> Figure:
    _check(builds)
    fig = _figure(3.0)
    ax = fig.subplots()
    gpu = [_peak_gpu(b.runs) for b in builds]
    if any(v.size for v in gpu):
        # GPU memory when any build has it: RSS of a CPU server would not compare with it.
        ngpu = max(v.size for v in gpu)
        groups = [f"GPU {g}" for g in range(ngpu)]
        table = [[float(v[g]) if g < v.size else np.nan for g in range(ngpu)] for v in gpu]
    else:
        groups = ["peak RSS (CPU)"]
        table = [[np.nan if (rss := _peak_rss(b.runs)) is None else rss] for b in builds]
    if all(np.isnan(v) for row in table for v in row):
        ax.set_axis_off()
        _note(ax, "no memory figures recorded")
        ax.set_title("peak memory", fontsize=10)
        return fig
    # Bars no wider than a quarter of a group, so one group of two bars does not fill the page.
    width = min(0.8 / len(builds), 0.25)
    for i, (b, row) in enumerate(zip(builds, table, strict=True)):
        offsets = np.arange(len(groups)) + (i - (len(builds) - 1) / 2) * width
        bars = ax.bar(offsets, row, width * 0.9, color=colour(i), label=b.label)
        ax.bar_label(bars, fmt="{:,.0f}", fontsize=9, padding=2)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_xlim(-0.5, len(groups) - 0.5)
    ax.set_ylabel("peak memory (MiB)")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.margins(y=0.12)  # room for the value labels above the bars
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("peak memory (max over all levels and repeats)", fontsize=10)
    handles = [Patch(facecolor=colour(i)) for i in range(len(builds))]
    _legend(fig, handles, [b.label for b in builds])
    return fig


def peak_memory(builds: Sequence[Build], path: Path) -> Path:
    """Grouped bars of peak memory per GPU per build; peak RSS when no GPU was measured."""
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
    loads = _loads(builds)
    scenarios, lengths = _titles(loads)
    fig = _figure(3.4)
    ax = fig.subplots()
    stats: list[tuple[int, int, dict[str, Any]]] = []  # (load index, build index, stats)
    for j, load in enumerate(loads):
        for i, b in enumerate(builds):
            rows = _by_load(b).get(load)
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
    ax.set_xticks(np.arange(len(loads)), [load.title(scenarios, lengths, "\n") for load in loads])
    ax.set_xlim(-0.6, len(loads) - 0.4)
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


# ---- all of them -------------------------------------------------------------------------


def all_figures(builds: Sequence[Build], out_dir: Path) -> dict[str, Path]:
    """Every figure as out_dir/<name>.png: ttft_cdf, e2e_cdf, vs_concurrency, peak_memory, itl."""
    out_dir = Path(out_dir)
    return {
        "ttft_cdf": latency_cdf(builds, "ttft_ms", out_dir / "ttft_cdf.png"),
        "e2e_cdf": latency_cdf(builds, "e2e_ms", out_dir / "e2e_cdf.png"),
        "vs_concurrency": vs_concurrency(builds, out_dir / "vs_concurrency.png"),
        "peak_memory": peak_memory(builds, out_dir / "peak_memory.png"),
        "itl": itl_distribution(builds, out_dir / "itl.png"),
    }
