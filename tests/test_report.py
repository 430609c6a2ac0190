"""Reports: what report.md and report.html say, and that they stay valid and self-contained."""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from bench import report, store
from bench.comparison import (
    Comparison,
    Geomean,
    MemoryRow,
    Metric,
    QuantileRow,
    Row,
    Side,
)
from bench.figures import Build
from bench.levels import Level, LevelStats, MeanSd
from bench.metrics import Distribution
from bench.records import (
    REQUESTS_SCHEMA,
    RUNS_SCHEMA,
    RequestRecord,
    RunRecord,
    to_table,
)
from bench.stats import Verdict, geomean, ratio_test
from bench.store import RunStore
from tests import markdown
from tests.synthetic import request_record, run_record

# ---- records with the real schemas -------------------------------------------------------


def _records(
    scenario: str, ttft_p99_by_concurrency: dict[int, float], repeats: int = 3
) -> tuple[list[RunRecord], list[RequestRecord]]:
    """A closed-loop sweep whose runs have the given TTFT p99; two requests per run."""
    runs, requests = [], []
    for level, (conc, p99) in enumerate(ttft_p99_by_concurrency.items()):
        for repeat in range(repeats):
            where = {"scenario": scenario, "level": level, "repeat": repeat, "concurrency": conc}
            runs.append(run_record(**where, ttft_ms_p99=p99 * (1 + 0.01 * (repeat - 1))))
            requests += [request_record(**where, index=i, ttft_ms=p99 / (2 - i)) for i in range(2)]
    return runs, requests


def _build(label: str, scale: float) -> Build:
    runs, requests = _records("sweep", {1: 20.0 * scale, 4: 40.0 * scale})
    return Build(
        label,
        to_table(runs, RUNS_SCHEMA).to_pandas(),
        to_table(requests, REQUESTS_SCHEMA).to_pandas(),
    )


# ---- a synthetic comparison --------------------------------------------------------------

C1 = Level("sweep", input_tokens=64, output_tokens=128, concurrency=1, request_rate=None)
C4 = Level("sweep", input_tokens=64, output_tokens=128, concurrency=4, request_rate=None)
TPUT = Metric("output_throughput", "out tok/s", "tok/s", True)
TTFT50 = Metric("ttft_ms_p50", "TTFT p50", "ms", False)
TTFT99 = Metric("ttft_ms_p99", "TTFT p99", "ms", False)
TPOT = Metric("tpot_ms_p50", "TPOT p50", "ms", False)
E2E = Metric("e2e_ms_p50", "E2E p50", "ms", False)
HOSTILE = "candidate <script>alert(1)</script>"


def _row(
    level: Level,
    metric: Metric,
    scale: float,
    p_adjusted: float,
    verdict: Verdict = "~",
    gate: float = 0.05,
    regression: bool = False,
) -> Row:
    base = [100.0, 102.0, 98.0, 101.0, 99.0]
    cand = [v * scale for v in [101.0, 99.0, 100.0, 98.0, 102.0]]
    return Row(
        level=level,
        metric=metric,
        baseline=base,
        candidate=cand,
        baseline_geomean=geomean(base),
        candidate_geomean=geomean(cand),
        test=ratio_test(base, cand),
        p_adjusted=p_adjusted,
        verdict=verdict,
        gate=gate,
        regression=regression,
    )


def _side(label: str, source: str) -> Side:
    return Side(
        label=label,
        source=source,
        run_dirs=["results/runs/a"],
        model="tiny",
        target_kind="bundled",
        engine="quantization=int8" if label != "baseline" else "",
        kernels="attention=cpu-kernel linear=" + ("int8" if label != "baseline" else "panel-gemm"),
        git_commit="0123456789abcdef",
        git_dirty=label != "baseline",
        hardware_key="cpu",
        started_at="2026-01-01T00:00:00+00:00",
    )


REGRESSION = _row(C4, TTFT99, 1.25, 0.0004, "worse", regression=True)
WORSE_WITHIN_GATE = _row(C4, TPOT, 1.07, 0.02, "worse", gate=0.10)
IMPROVED = _row(C1, TPUT, 1.2, 0.003, "better")
UNCHANGED_E2E = _row(C1, E2E, 1.0, 1.0)
UNTESTED = Row(C4, E2E, [50.0], [], 50.0, math.nan, None, math.nan, "~", 0.05, False)
ROWS = [
    IMPROVED,
    _row(C1, TTFT50, 1.0, 1.0),
    _row(C1, TTFT99, 1.01, 0.9),
    UNCHANGED_E2E,
    _row(C4, TPUT, 0.99, 0.9),
    _row(C4, TTFT50, 1.02, 0.5),
    REGRESSION,
    WORSE_WITHIN_GATE,
    UNTESTED,
]
COMPARISON = Comparison(
    mode="stored baseline",
    baseline=_side("baseline", "main"),
    candidate=_side(HOSTILE, "results/pr"),
    alpha=0.05,
    threshold=0.02,
    rows=ROWS,
    quantiles=[QuantileRow(C4, "ttft_ms", 0.99, 40.0, 50.0, 1.25, 1.1, 1.4, (30, 30))],
    memory=[MemoryRow(C4, "RSS", 600.0, 540.0, -10.0, "better")],
    geomeans=[Geomean(TPUT, 1.09), Geomean(TTFT99, 1.12)],
    mismatches=["hardware_key: 'cpu' vs 'H100 x1'"],
    warnings=["sweep 64/128 c=4: 3 repeats per build; comparisons need at least 5"],
)


@pytest.fixture(scope="module")
def ab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    builds = [_build("baseline", 1.0), _build(HOSTILE, 1.25)]
    return report.write_comparison_report(COMPARISON, builds, tmp_path_factory.mktemp("ab"))


def _md(paths: dict[str, Path]) -> str:
    return paths["md"].read_text(encoding="utf-8")


def _section(md: str, start: str, end: str) -> str:
    return md[md.index(start) : md.index(end, md.index(start))]


def _compact(md: str) -> str:
    return _section(md, "## Changes", "## Geometric mean")


def _line_of(text: str, *needles: str) -> list[str]:
    return [line for line in text.splitlines() if all(n in line for n in needles)]


def test_the_counts_line_says_how_many_rows_improved_regressed_and_did_not_change(
    ab: dict[str, Path],
) -> None:
    assert "1 improved · 2 regressed · 6 unchanged" in _md(ab)


def test_the_sides_table_says_what_each_build_computed_with(ab: dict[str, Path]) -> None:
    # e.g. a candidate whose attention fell back to torch must not pass for a faster kernel
    assert _line_of(_md(ab), "| kernels |", "linear=panel-gemm", "linear=int8")


def test_a_regression_beyond_the_gate_says_the_comparison_fails(ab: dict[str, Path]) -> None:
    assert "1 regression beyond the gate: this comparison fails" in _md(ab)


def test_mismatches_are_warned_about_before_the_first_table(ab: dict[str, Path]) -> None:
    md = _md(ab)
    warning = md.index("> [!WARNING]")
    assert "allow_mismatch=true" in md
    assert "> - hardware_key: 'cpu' vs 'H100 x1'" in md
    assert warning < md.index("\n|")


def test_every_regression_is_in_the_compact_table_in_bold_and_marked_worse(
    ab: dict[str, Path],
) -> None:
    for row in COMPARISON.regressions:
        lines = _line_of(_compact(_md(ab)), row.level.name, row.metric.label)
        assert len(lines) == 1
        assert "**worse ❌**" in lines[0]
        assert f"**{row.delta_pct:+.1f}% [" in lines[0]


def test_a_worse_row_within_its_gate_is_listed_but_not_bold(ab: dict[str, Path]) -> None:
    (line,) = _line_of(_compact(_md(ab)), C4.name, "TPOT p50")
    assert "worse ❌" in line and "**" not in line


def test_the_compact_table_shows_throughput_and_ttft_at_every_level_and_hides_the_rest(
    ab: dict[str, Path],
) -> None:
    compact = _compact(_md(ab))
    for level in (C1, C4):
        for label in ("↑ out tok/s", "↓ TTFT p50 ms", "↓ TTFT p99 ms"):
            assert len(_line_of(compact, level.name, label)) == 1, (level.name, label)
    assert not _line_of(compact, "E2E p50")  # unchanged and not a key metric


def test_p_values_are_shown_to_three_decimals_or_as_below_a_thousandth(
    ab: dict[str, Path],
) -> None:
    compact = _compact(_md(ab))
    assert "<0.001" not in compact  # escaped in Markdown, like every "<"
    assert "&lt;0.001" in _line_of(compact, C4.name, "TTFT p99")[0]
    assert "| 0.003 |" in _line_of(compact, C1.name, "out tok/s")[0]


def test_the_details_block_lists_every_row_quantile_and_memory_row(ab: dict[str, Path]) -> None:
    md = _md(ab)
    rows = _section(md, "<summary>All 9 comparisons", "</details>")
    for row in ROWS:
        assert len(_line_of(rows, row.level.name, row.metric.label)) == 1
    quantiles = _section(md, "<summary>Per-request quantiles", "</details>")
    assert _line_of(quantiles, C4.name, "TTFT p99 ms", "(too few)")  # 30 requests for a p99
    assert _line_of(_section(md, "<summary>Peak memory", "</details>"), C4.name, "better ✅")


def test_every_markdown_table_row_has_as_many_cells_as_its_header(ab: dict[str, Path]) -> None:
    tables = markdown.tables(_md(ab))
    assert len(tables) >= 5
    for table in tables:
        assert all(len(row) == len(table[0]) for row in table), table


def test_image_links_point_at_figures_next_to_report_md(ab: dict[str, Path]) -> None:
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", _md(ab))
    assert len(links) == 5
    assert all((ab["md"].parent / link).is_file() for link in links)


def test_the_result_maps_md_html_and_each_figure_to_its_file(ab: dict[str, Path]) -> None:
    names = {"md", "html", "ttft_cdf", "e2e_cdf", "vs_concurrency", "peak_memory", "itl"}
    assert set(ab) == names
    assert all(path.is_file() for path in ab.values())


def test_warnings_are_listed_at_the_end(ab: dict[str, Path]) -> None:
    md = _md(ab)
    assert md.index("## Warnings") > md.rindex("</details>")
    assert "- sweep 64/128 c=4: 3 repeats per build" in md


def test_text_is_escaped_in_markdown(ab: dict[str, Path]) -> None:
    assert "<script>" not in _md(ab)
    assert "&lt;script&gt;" in _md(ab)


def test_markdown_shows_markup_in_labels_literally() -> None:
    label = "a|b [x](http://e) *y* _z_ short_qa"
    md = report.markdown([report.Table(["level", "n"], [[label, "1"]])])
    assert "| a\\|b [x\\](http://e) \\*y\\* \\_z\\_ short_qa | 1 |" in md
    assert all(len(row) == 2 for row in markdown.tables(md)[0])


def test_html_is_self_contained_with_images_as_data_uris(ab: dict[str, Path]) -> None:
    page = ab["html"].read_text(encoding="utf-8")
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(sources) == 5
    prefix = "data:image/png;base64,"
    assert all(s.startswith(prefix) for s in sources)
    assert all(base64.b64decode(s.removeprefix(prefix)).startswith(b"\x89PNG") for s in sources)


def test_html_escapes_text(ab: dict[str, Path]) -> None:
    page = ab["html"].read_text(encoding="utf-8")
    assert "<script>" not in page
    assert "candidate &lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_html_marks_the_regression_row(ab: dict[str, Path]) -> None:
    page = ab["html"].read_text(encoding="utf-8")
    marked = re.findall(r'<tr class="marked">(.*?)</tr>', page)
    assert any(C4.name in row and "TTFT p99" in row for row in marked)
    assert not any("TPOT" in row for row in marked)


# ---- one build ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    for run_id, scenario, p99 in (
        ("run-a", "sweep", {1: 500.0, 2: 900.0, 4: 1800.0, 8: 2500.0}),
        ("run-b", "slow", {1: 3000.0, 2: 4000.0}),
    ):
        s = RunStore(root, run_id)
        s.runs, s.requests = _records(scenario, p99)
        s.flush()
    return report.write_run_report([root / "run-a", root / "run-b"], root / "report", 2000.0)


def test_capacity_is_the_highest_level_whose_ttft_p99_meets_the_slo(
    single: dict[str, Path],
) -> None:
    md = _md(single)
    assert "Capacity at TTFT p99 ≤ 2000 ms: 4 concurrent users (sweep 64/128)**" in md


def test_capacity_says_none_when_no_level_meets_the_slo(single: dict[str, Path]) -> None:
    (line,) = _line_of(_md(single), "(slow 64/128)")
    assert "none of the measured levels meets it" in line


def test_capacity_names_a_lower_level_that_misses_the_slo() -> None:
    def level(concurrency: int, p99: float) -> LevelStats:
        latency = Distribution(mean=1.0, p50=1.0, p90=1.0, p99=p99)
        return LevelStats(
            level=Level(
                "s", input_tokens=1, output_tokens=1, concurrency=concurrency, request_rate=None
            ),
            repeats=5,
            sent=10,
            completed=10,
            ttft_ms=latency,
            ttfo_ms=Distribution.of([]),
            itl_ms=latency,
            tpot_ms=latency,
            e2e_ms=latency,
            output_throughput=MeanSd(1.0, 0.0),
            request_throughput=MeanSd(1.0, 0.0),
            peak_memory=None,
            client_bound=0,
            partial=0,
        )

    (line,) = report.capacity([level(1, 10.0), level(2, 99.0), level(4, 10.0)], 50.0)
    assert ": 4 concurrent users" in line and "2 concurrent users, below it, misses it" in line


def test_the_run_report_has_a_row_per_level_with_the_p99_of_all_its_requests(
    single: dict[str, Path],
) -> None:
    (table, *_) = markdown.tables(_md(single))
    rows = {row[0]: row for row in table[1:]}
    assert len(rows) == 6
    # Three runs of two requests each, at 1,250 and 2,500 ms: p99 of the six pooled.
    assert rows["sweep 64/128 c=8"][table[0].index("TTFT p99 ms")] == "2,500"


def test_the_run_report_has_html_and_linked_figures(single: dict[str, Path]) -> None:
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", _md(single))
    # The five of a comparison, and the run's telemetry timeline.
    assert len(links) == 6 and all((single["md"].parent / link).is_file() for link in links)
    assert "data:image/png;base64," in single["html"].read_text(encoding="utf-8")


def test_a_folder_of_run_directories_reports_each_of_them(tmp_path: Path) -> None:
    for run_id in ("b", "a"):
        RunStore(tmp_path, run_id).flush()
    (tmp_path / "not-a-run").mkdir()
    assert store.find_run_dirs([tmp_path]) == [tmp_path / "a", tmp_path / "b"]


def test_runs_anywhere_below_a_folder_are_found_except_in_hidden_folders(tmp_path: Path) -> None:
    """What an A/B round or a multirun leaves: runs a few folders down, Hydra's own beside."""
    for where in ("baseline/a", "baseline/b", "candidate/round-1/c", ".hydra/d"):
        RunStore(tmp_path, where).flush()
    found = store.find_run_dirs([tmp_path])
    assert found == [tmp_path / w for w in ("baseline/a", "baseline/b", "candidate/round-1/c")]


# ---- command line ------------------------------------------------------------------------


def _cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = report.main(argv)
    return code, capsys.readouterr().err


def test_cli_refuses_an_unknown_key_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _cli([f"run={tmp_path}", "colour=red"], capsys)
    assert code == 2 and err.startswith("error: ") and "'colour'" in err


def test_cli_refuses_a_missing_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _cli([f"run={tmp_path / 'nope'}"], capsys)
    assert code == 2 and f"error: run directory {tmp_path / 'nope'} does not exist" in err


def test_cli_refuses_a_directory_without_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _cli([f"run={tmp_path}"], capsys)
    assert code == 2 and "has no runs.parquet" in err


def test_cli_refuses_a_bad_slo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _cli([f"run={tmp_path}", "slo.ttft_ms=fast"], capsys)
    assert code == 2 and "'fast'" in err and "(key slo.ttft_ms)" in err


def test_cli_help_lists_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(key in out for key in ("run=PATH", "report=DIR", "slo.ttft_ms="))


def test_the_environment_says_how_each_client_worker_kept_up() -> None:
    rows = [
        run_record(level=0, workers=2, worker_loop_lag_ms_p99=[0.2, 1.5],
                   worker_send_lag_ms_p99=[0.1, 0.3], worker_clock_uncertainty_ms=[0.4, 0.3]),
        run_record(level=1, workers=2, worker_loop_lag_ms_p99=[0.9, 0.1],
                   worker_send_lag_ms_p99=[0.2, 0.1], worker_clock_uncertainty_ms=[0.4, 0.3]),
    ]  # fmt: skip
    runs = to_table(rows, RUNS_SCHEMA).to_pandas()
    assert report._client(runs) == (
        "2 workers; per worker, loop lag p99 up to 0.90 / 1.50 ms and send lag p99 up to "
        "0.20 / 0.30 ms; clocks known to ±0.40 ms"
    )
    one = to_table([run_record()], RUNS_SCHEMA).to_pandas()
    assert report._client(one) == "one process"
