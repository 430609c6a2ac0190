"""Figures: what each one draws, read back from the matplotlib Figure before it becomes pixels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bench import figures
from bench.figures import Build
from bench.records import REQUESTS_SCHEMA, RUNS_SCHEMA, RequestRecord, RunRecord, to_table
from tests.synthetic import request_record, run_record

# ---- synthetic builds with the real record types -----------------------------------------

REQUEST = request_record(
    scenario="concurrency", input_tokens=128, output_tokens_requested=16, prompt_tokens=128
)
FAILED = {"ok": False, "error": "timeout", "ttft_ms": None, "tpot_ms": None, "e2e_ms": None}
FAILED |= {"ttft_from_scheduled_ms": None, "e2e_from_scheduled_ms": None, "itl_ms": []}


def _run_record(**fields: Any) -> RunRecord:
    shape = {"scenario": "concurrency", "input_tokens": 128, "output_tokens": 16}
    return run_record(**(shape | fields))


def _frames(requests: list[RequestRecord], runs: list[RunRecord]) -> tuple[Any, Any]:
    """DataFrames as bench.store.load returns them: through Arrow, lists as numpy arrays."""
    return (
        to_table(runs, RUNS_SCHEMA).to_pandas(),
        to_table(requests, REQUESTS_SCHEMA).to_pandas(),
    )


def _build(
    label: str,
    *,
    loads: Sequence[tuple[int | None, float | None]],
    scale: float = 1.0,
    repeats: int = 3,
    failures: int = 0,
    **run_fields: Any,
) -> Build:
    """A build with 8 requests per (load, repeat); the first `failures` of each level fail."""
    rng = np.random.default_rng(len(label))
    requests, runs = [], []
    for level, (conc, rate) in enumerate(loads):
        for repeat in range(repeats):
            load = {"level": level, "repeat": repeat, "concurrency": conc, "request_rate": rate}
            for index in range(8):
                ttft = float(scale * (level + 1) * rng.uniform(5, 15))
                itl = list(scale * rng.uniform(2, 8, size=3))
                fields = {"ttft_ms": ttft, "e2e_ms": ttft * 4, "itl_ms": itl}
                if repeat == 0 and index < failures:
                    fields = FAILED
                requests.append(replace(REQUEST, index=index, **load, **fields))
            throughput = 100.0 * (level + 1) + 10 * repeat
            runs.append(
                _run_record(
                    **load,
                    output_throughput=throughput,
                    ttft_ms_p50=scale * (level + 1) * (10 + repeat),
                    ttft_ms_p99=scale * (level + 1) * (20 + repeat),
                    **run_fields,
                )
            )
    run_frame, request_frame = _frames(requests, runs)
    return Build(label, run_frame, request_frame)


CLOSED = [(1, None), (2, None), (4, None)]
OPEN = [(None, 2.0), (None, 8.0)]
BASE = _build("baseline (abc123)", loads=CLOSED)
CAND = _build("candidate (int8)", loads=CLOSED, scale=0.7, failures=2, peak_rss_mib=500.0)
AB = [BASE, CAND]


def _legend_texts(fig: Figure) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def _legend_colours(fig: Figure) -> dict[str, str]:
    """Build label -> the colour of its legend handle, as hex."""
    from matplotlib.colors import to_hex

    out = {}
    for legend in fig.legends:
        for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
            assert handle is not None
            get = getattr(handle, "get_color", None) or handle.get_facecolor  # type: ignore[attr-defined]
            out[text.get_text()] = to_hex(get(), keep_alpha=False)
    return out


def _all_figures(builds: list[Build]) -> dict[str, Figure]:
    return {
        "ttft_cdf": figures._latency_cdf_figure(builds, "ttft_ms"),
        "e2e_cdf": figures._latency_cdf_figure(builds, "e2e_ms"),
        "vs_concurrency": figures._vs_concurrency_figure(builds),
        "peak_memory": figures._peak_memory_figure(builds),
        "itl": figures._itl_figure(builds),
    }


@pytest.fixture(scope="module")
def ab_figures() -> dict[str, Figure]:
    """The A/B figures, drawn once: the tests below only read them."""
    return _all_figures(AB)


def _drawn_axes(fig: Figure) -> list[Axes]:
    return [ax for ax in fig.axes if ax.axison]


# ---- files ---------------------------------------------------------------------------------


def test_all_figures_writes_five_non_empty_pngs(tmp_path: Path) -> None:
    paths = figures.all_figures(AB, tmp_path / "figs")
    assert set(paths) == {"ttft_cdf", "e2e_cdf", "vs_concurrency", "peak_memory", "itl"}
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5_000


def test_figures_stay_out_of_pyplot_so_none_leak(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    figures.peak_memory([BASE], tmp_path / "m.png")
    assert plt.get_fignums() == before


# ---- labels, legends, colours --------------------------------------------------------------


def test_every_figure_of_one_build_has_a_legend_naming_it() -> None:
    for name, fig in _all_figures([BASE]).items():
        assert any(t == BASE.label for t in _legend_texts(fig)), name


def test_every_figure_of_two_builds_has_a_legend_naming_both(
    ab_figures: dict[str, Figure],
) -> None:
    for name, fig in ab_figures.items():
        texts = _legend_texts(fig)
        for b in AB:
            assert any(t.startswith(b.label) for t in texts), (name, texts)


def test_every_axis_is_labelled_with_its_unit(ab_figures: dict[str, Figure]) -> None:
    figs = ab_figures
    units = {
        "ttft_cdf": ("TTFT (ms)", "fraction of requests"),
        "e2e_cdf": ("E2E latency (ms)", "fraction of requests"),
        "itl": ("load level", "ITL (ms)"),
        "peak_memory": ("load level", "peak memory (MiB)"),
    }
    for name, (xlabel, ylabel) in units.items():
        axes = _drawn_axes(figs[name])
        assert xlabel in [ax.get_xlabel() for ax in axes], name
        assert any(ax.get_ylabel().startswith(ylabel) for ax in axes), name
    ttft, tput = figs["vs_concurrency"].axes
    assert (ttft.get_ylabel(), tput.get_ylabel()) == ("TTFT (ms)", "output throughput (tok/s)")
    assert ttft.get_xlabel() == tput.get_xlabel() == "concurrency (users)"


def test_a_build_keeps_its_colour_in_every_figure(ab_figures: dict[str, Figure]) -> None:
    seen: dict[str, set[str]] = {b.label: set() for b in AB}
    for fig in ab_figures.values():
        for text, c in _legend_colours(fig).items():
            for label in seen:
                if text.startswith(label):
                    seen[label].add(c)
    assert seen == {BASE.label: {figures.colour(0)}, CAND.label: {figures.colour(1)}}
    assert figures.colour(0) != figures.colour(1)


def test_cdf_lines_have_their_builds_colour() -> None:
    fig = figures._latency_cdf_figure(AB, "ttft_ms")
    for ax in _drawn_axes(fig):
        assert [line.get_color() for line in ax.lines] == [figures.colour(0), figures.colour(1)]


# ---- the data drawn ------------------------------------------------------------------------


def test_cdf_has_a_panel_per_load_level_that_ends_at_one_at_the_largest_value() -> None:
    fig = figures._latency_cdf_figure(AB, "ttft_ms")
    axes = _drawn_axes(fig)
    assert [ax.get_title() for ax in axes] == ["c=1", "c=2", "c=4"]
    for ax, (conc, _) in zip(axes, CLOSED, strict=True):
        for line, b in zip(ax.lines, AB, strict=True):
            rows = b.requests[(b.requests.concurrency == conc) & b.requests.ok]
            x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
            assert y[0] == 0.0 and y[-1] == 1.0
            assert np.all(np.diff(y) >= 0)
            assert x.max() == rows.ttft_ms.max() and x.min() == rows.ttft_ms.min()
            assert len(x) == len(rows) + 1  # the step up from 0 at the smallest value


def test_cdf_draws_successful_requests_only_and_counts_failures_in_the_legend() -> None:
    fig = figures._latency_cdf_figure(AB, "e2e_ms")
    c1 = _drawn_axes(fig)[0]
    assert len(c1.lines[1].get_xdata()) == 3 * 8 - 2 + 1  # 2 of 24 requests failed
    assert _legend_texts(fig) == [BASE.label, f"{CAND.label} · 6 of 72 failed, not drawn"]


def test_cdf_x_axis_is_log_when_latencies_span_more_than_ten_times() -> None:
    narrow = _build("narrow", loads=[(1, None)])
    wide = _build("wide", loads=[(1, None)], scale=100.0)
    assert _drawn_axes(figures._latency_cdf_figure([narrow], "ttft_ms"))[0].get_xscale() == "linear"
    both = figures._latency_cdf_figure([narrow, wide], "ttft_ms")
    assert _drawn_axes(both)[0].get_xscale() == "log"


def test_cdf_of_a_single_load_level_is_one_panel() -> None:
    one = _build("one level", loads=[(4, None)])
    fig = figures._latency_cdf_figure([one], "ttft_ms")
    assert [ax.get_title() for ax in fig.axes] == ["c=4"]


def test_a_sweep_over_lengths_at_one_load_is_never_pooled() -> None:
    """scenario=lengths: three lengths, all at one user; the levels differ only in lengths."""
    short, long_ = _build("sweep", loads=[(1, None)]), _build("sweep", loads=[(1, None)], scale=3)
    long_runs = long_.runs.assign(level=1, input_tokens=1024, output_tokens=512)
    long_requests = long_.requests.assign(level=1, input_tokens=1030)  # spread: range_ratio
    build = Build("sweep", pd.concat([short.runs, long_runs]),
                  pd.concat([short.requests, long_requests]))  # fmt: skip
    panels = _drawn_axes(figures._latency_cdf_figure([build], "ttft_ms"))
    assert [ax.get_title() for ax in panels] == ["128/16 c=1", "1024/512 c=1"]
    # 24 requests each (8 x 3 repeats), plus the step up from 0: no level holds the other's.
    assert [len(ax.lines[0].get_xdata()) for ax in panels] == [25, 25]
    ticks = figures._itl_figure([build]).axes[0].get_xticklabels()
    assert [t.get_text() for t in ticks] == ["128/16 c=1", "1024/512 c=1"]
    ttft = figures._vs_concurrency_figure([build]).axes[0]
    drawn = {float(line.get_ydata()[0]) for line in ttft.lines if len(line.get_ydata())}
    requests = build.requests[build.requests.ok]
    p50s = {float(np.percentile(requests[requests.level == lv].ttft_ms, 50)) for lv in (0, 1)}
    assert p50s <= drawn  # each lengths level its own point, not both levels' requests pooled


def _bars(ax: Axes) -> tuple[list[float], list[float]]:
    """The low and high ends of the first errorbar's bars, one vertical segment per point."""
    segments = ax.collections[0].get_segments()
    return [float(s[:, 1].min()) for s in segments], [float(s[:, 1].max()) for s in segments]


def test_vs_concurrency_draws_ttft_of_all_requests_with_the_runs_own_range() -> None:
    ttft = figures._vs_concurrency_figure([BASE]).axes[0]
    line = ttft.lines[0]  # errorbar's data line comes first: p50
    ok = BASE.requests[BASE.requests.ok]
    pooled = ok.groupby("concurrency").ttft_ms.quantile(0.5)  # linear, as numpy's
    per_run = BASE.runs.groupby("concurrency").ttft_ms_p50.agg(["min", "max"])
    np.testing.assert_allclose(line.get_xdata(), [1.0, 2.0, 4.0])
    np.testing.assert_allclose(line.get_ydata(), pooled)
    low, high = _bars(ttft)
    np.testing.assert_allclose(low, np.minimum(per_run["min"], pooled))
    np.testing.assert_allclose(high, np.maximum(per_run["max"], pooled))
    drawn = [line.get_linestyle() for line in ttft.lines if line.get_linestyle() != "None"]
    assert drawn == ["-", "--"]  # p50 solid, p99 dashed; the caps have no line


def test_vs_concurrency_draws_throughput_as_the_mean_of_repeats_plus_minus_sd() -> None:
    skewed = BASE.runs.assign(output_throughput=100.0 * (1 + BASE.runs.level + BASE.runs.repeat**2))
    tput = figures._vs_concurrency_figure([replace(BASE, runs=skewed)]).axes[1]
    expected = skewed.groupby("concurrency").output_throughput.agg(["mean", "std"])
    np.testing.assert_allclose(tput.lines[0].get_ydata(), expected["mean"])
    low, high = _bars(tput)
    np.testing.assert_allclose(low, expected["mean"] - expected["std"])
    np.testing.assert_allclose(high, expected["mean"] + expected["std"])


def test_vs_concurrency_has_log2_ticks_at_the_measured_concurrencies() -> None:
    ttft, _ = figures._vs_concurrency_figure(AB).axes
    assert ttft.get_xscale() == "log"
    assert list(ttft.get_xticks()) == [1.0, 2.0, 4.0]
    assert [t.get_text() for t in ttft.get_xticklabels()] == ["1", "2", "4"]


def test_vs_concurrency_of_open_loop_runs_is_against_request_rate() -> None:
    open_loop = _build("open loop", loads=OPEN, failures=1)
    ttft, tput = figures._vs_concurrency_figure([open_loop]).axes
    assert ttft.get_xlabel() == "request rate (req/s)"
    assert list(ttft.lines[0].get_xdata()) == [2.0, 8.0]
    assert list(tput.get_xticks()) == [2.0, 8.0]


def test_open_loop_levels_are_titled_by_rate_in_every_figure() -> None:
    open_loop = _build("open loop", loads=OPEN, failures=1)
    cdf = figures._latency_cdf_figure([open_loop], "ttft_ms")
    assert [ax.get_title() for ax in cdf.axes] == ["2/s", "8/s"]
    itl = figures._itl_figure([open_loop])
    assert [t.get_text() for t in itl.axes[0].get_xticklabels()] == ["2/s", "8/s"]


def test_peak_memory_draws_each_levels_gpu_total_per_build() -> None:
    two_gpus = {"peak_gpu_memory_mib": [1000.0, 2000.0], "peak_gpu_memory_mib_total": 3000.0}
    gpu_a = _build("a", loads=CLOSED, **two_gpus)
    gpu_b = _build(
        "b", loads=CLOSED[:2], peak_gpu_memory_mib=[1500.0], peak_gpu_memory_mib_total=1500.0
    )
    ax = figures._peak_memory_figure([gpu_a, gpu_b]).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c=1", "c=2", "c=4"]
    heights = [p.get_height() for p in ax.patches]
    assert heights[:3] == [3000.0] * 3
    assert heights[3:5] == [1500.0] * 2 and np.isnan(heights[5])  # b has no c=4
    assert "GPU total" in ax.get_title()


def test_peak_memory_falls_back_to_peak_rss_without_gpu_figures() -> None:
    ax = figures._peak_memory_figure(AB).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c=1", "c=2", "c=4"]
    assert [p.get_height() for p in ax.patches] == [600.0] * 3 + [500.0] * 3
    assert "server RSS" in ax.get_title()


def test_peak_memory_of_a_level_is_the_maximum_over_its_repeats() -> None:
    runs = BASE.runs.assign(peak_rss_mib=600.0 + 10.0 * BASE.runs.repeat)
    ax = figures._peak_memory_figure([replace(BASE, runs=runs)]).axes[0]
    assert [p.get_height() for p in ax.patches] == [620.0] * 3


def test_peak_memory_without_any_figures_says_so(tmp_path: Path) -> None:
    none = _build("none", loads=CLOSED, peak_rss_mib=None)
    fig = figures._peak_memory_figure([none])
    assert [t.get_text() for t in fig.axes[0].texts] == ["no memory figures recorded"]
    assert figures.peak_memory([none], tmp_path / "m.png").stat().st_size > 0


def test_itl_boxes_mark_p50_and_p99_of_the_pooled_successful_itl() -> None:
    ax = figures._itl_figure(AB).axes[0]
    rows = CAND.requests[(CAND.requests.concurrency == 2) & CAND.requests.ok]
    pooled = np.concatenate(list(rows.itl_ms))
    p1, p50, p99 = np.percentile(pooled, [1, 50, 99])
    ys = {round(float(y), 9) for line in ax.lines for y in line.get_ydata()}
    assert {round(p1, 9), round(p50, 9), round(p99, 9)} <= ys
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c=1", "c=2", "c=4"]


def test_itl_without_values_says_so() -> None:
    empty = replace(BASE, requests=BASE.requests.assign(itl_ms=[[]] * len(BASE.requests)))
    fig = figures._itl_figure([empty])
    assert [t.get_text() for t in fig.axes[0].texts] == ["no ITL values recorded"]


# ---- refusals ------------------------------------------------------------------------------


def test_builds_with_the_same_label_are_refused() -> None:
    with pytest.raises(ValueError, match="labels must differ"):
        figures._vs_concurrency_figure([BASE, BASE])


def test_an_unknown_latency_metric_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        figures._latency_cdf_figure(AB, "ttft")


def test_a_build_missing_columns_is_refused_with_what_to_pass() -> None:
    with pytest.raises(ValueError, match=r"bench\.store\.load"):
        Build("x", BASE.runs, pd.DataFrame({"ttft_ms": [1.0]}))
