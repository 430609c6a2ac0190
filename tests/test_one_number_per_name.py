"""Every output names a level's statistics alike, and one name always shows one number.

The same stored runs go through the console table, `python -m bench.report` and
`python -m bench.compare` (report.md, the console table it prints, the peak-memory figure); the
tests parse what each shows and hold it to three rules: a name shared by several outputs shows
the same number in each (within the rounding of its display), a change is candidate / baseline
- 1 of the values shown beside it, and the figure draws what the table says.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from bench import compare, figures, report, store
from bench.config import LoadLevel
from bench.figures import Build
from bench.levels import levels_of
from bench.records import RUNS_SCHEMA, to_table
from bench.store import RunStore
from bench.summary import print_summary
from tests import markdown
from tests.synthetic import request_record, run_record

REPEATS, PER_RUN = 5, 40
# (scenario, concurrencies, peak RSS of the first repeat): three scenarios of one build, each
# its own server start, with peaks that differ by scenario and grow by repeat.
SCENARIOS = (("concurrency", (1, 8), 690.0), ("short_qa", (1,), 870.0), ("lengths", (1,), 700.0))
C8 = "64/128 c=8"  # the level the user looked at: its label, and its name with the scenario
C8_NAME = f"concurrency {C8}"


def _store_build(root: Path, side: str, load_times: tuple[float, ...], seed: int) -> list[RunStore]:
    """One build: a run (directory and records) per scenario. TTFT spreads differently in
    each repeat, so the pooled p99 differs from every run's own; throughput and memory vary
    from repeat to repeat, so a mean, a median and a maximum over repeats all differ."""
    rng = np.random.default_rng(seed)
    stores = []
    for (scenario, users, rss), load_time in zip(SCENARIOS, load_times, strict=True):
        s = RunStore(root / side, f"{side}-{scenario}")
        for level, c in enumerate(users):
            for repeat in range(REPEATS):
                where = {"run_id": s.dir.name, "scenario": scenario, "level": level}
                where |= {"repeat": repeat, "concurrency": c}
                ttft = rng.lognormal(math.log(20.0 * c), 0.3 + 0.15 * repeat, PER_RUN)
                s.requests += [
                    request_record(
                        **where,
                        index=i,
                        ttft_ms=float(t),
                        e2e_ms=5.0 * float(t),
                        tpot_ms=5.0,
                        itl_ms=[4.0, 5.0, 6.0],
                    )
                    for i, t in enumerate(ttft)
                ]
                p50, p99 = np.percentile(ttft, [50, 99])
                s.runs.append(
                    run_record(
                        **where,
                        ttft_ms_p50=float(p50),
                        ttft_ms_p99=float(p99),
                        e2e_ms_p50=5.0 * float(p50),
                        e2e_ms_p99=5.0 * float(p99),
                        tpot_ms_p50=5.0,
                        tpot_ms_p99=5.0,
                        output_throughput=float(1000.0 * rng.uniform(0.7, 1.3)),
                        request_throughput=float(8.0 * rng.uniform(0.9, 1.1)),
                        peak_rss_mib=rss + 3.0 * repeat,
                        load_time_s=load_time,
                        workload_hash=f"workload of {scenario}",
                    )
                )
        s.flush()
        stores.append(s)
    return stores


def _compare(base: Path, cand: Path, out: Path) -> tuple[str, str]:
    """What `python -m bench.compare` prints, and the report.md it writes into `out`.
    Synthetic runs carry no machine fingerprint: the comparison is allowed past that."""
    args = [f"baseline={base}", f"candidate={cand}", f"report={out}", "allow_mismatch=true"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        assert compare.main(args) in (0, compare.EXIT_REGRESSION)
    return printed.getvalue(), (out / "report.md").read_text()


# ---- reading numbers back ----------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?[\d,]*\.?\d+(?:e[-+]?\d+)?")


def _value(text: str) -> tuple[float, float]:
    """A displayed number and half its last displayed digit: "1,974.4" -> (1974.4, 0.05)."""
    match = _NUMBER.search(text)
    assert match is not None, f"no number in {text!r}"
    shown = match.group().replace(",", "")
    mantissa, _, exponent = shown.partition("e")
    decimals = len(mantissa.partition(".")[2])
    half = 0.5 * 10.0 ** (int(exponent or 0) - decimals)
    return float(shown), half


def _same(a: str, b: str) -> bool:
    (x, hx), (y, hy) = _value(a), _value(b)
    return abs(x - y) <= hx + hy + 1e-9 and a.split()[1:] == b.split()[1:]  # and the unit


def _agree(texts: list[str]) -> bool:
    return all(_same(a, b) for a in texts for b in texts)


def _metric_name(cell: str) -> str:
    return cell.removeprefix("↑ ").removeprefix("↓ ")


def _console_level(text: str, label: str) -> dict[str, str]:
    """The console table's two lines for a level, by the name of each figure."""
    lines = text.splitlines()
    (i,) = [i for i, line in enumerate(lines) if line.split()[:2] == label.split()]
    p50, p99 = lines[i].split()[4:], lines[i + 1].split()[1:]
    names = ("TTFT", "ITL", "TPOT", "E2E")
    shown = {f"{n} p50 ms": v for n, v in zip(names, p50, strict=False)}
    shown |= {f"{n} p99 ms": v for n, v in zip(names, p99, strict=False)}
    shown |= {"out tok/s": p50[4], "req/s": p50[5], "peak MiB": f"{p50[6]} {p50[7]}"}
    shown["± sd"] = p99[5]
    return shown


def _report_level(md: str, name: str) -> dict[str, str]:
    """bench.report's results table, one level's row, by column."""
    header, *rows = markdown.tables(md)[0]
    (row,) = [r for r in rows if r[0] == name]
    return dict(zip(header, row, strict=True))


def _comparison_level(md: str, name: str) -> list[dict[str, str]]:
    """Every table of compare's report.md that shows the level: name -> the baseline's value
    (per table, since a name must agree across tables too)."""
    out = []
    for header, *rows in markdown.tables(md):
        if header[:2] == ["level", "metric"]:
            out.append({_metric_name(r[1]): r[2] for r in rows if r[0] == name})
        elif header[:2] == ["level", "memory"]:
            (row,) = [r for r in rows if r[0] == name]
            out.append({"peak MiB": f"{row[2]} {row[1]}"})
    return out


# ---- one run through every output --------------------------------------------------------


def test_one_run_shows_the_same_number_under_each_name_in_every_output(tmp_path: Path) -> None:
    (run, *_) = _store_build(tmp_path, "run", load_times=(3.1, 2.0, 4.5), seed=0)
    run_dir, loaded = run.dir, store.load(run.dir)

    console = Console(width=200, record=True, file=io.StringIO())
    print_summary(run.runs, run.requests, console)
    single = report.write_run_report([run_dir], tmp_path / "report")["md"].read_text()
    _, pair = _compare(run_dir, run_dir, tmp_path / "compare")

    outputs = {
        "console": _console_level(console.export_text(), C8),
        "bench.report": _report_level(single, C8_NAME),
    }
    for i, table in enumerate(_comparison_level(pair, C8_NAME)):
        outputs[f"compare table {i}"] = table
    shown: dict[str, dict[str, str]] = {}
    for output, values in outputs.items():
        for name, text in values.items():
            if _NUMBER.search(text):
                shown.setdefault(name, {})[output] = text
    shared = {name: by for name, by in shown.items() if len(by) > 1}
    # The names the user compared across outputs are among them, so this is not vacuous.
    assert {"TTFT p99 ms", "TTFT p50 ms", "E2E p99 ms", "out tok/s", "peak MiB"} <= set(shared)
    differing = {name: by for name, by in shared.items() if not _agree(list(by.values()))}
    assert differing == {}
    # And the number is the statistic its name defines (docs/metrics.md).
    ok = loaded.requests[(loaded.requests.level == 1) & loaded.requests.ok]
    assert _same(shown["TTFT p99 ms"]["console"], f"{np.percentile(ok.ttft_ms, 99):.6f}")
    c8 = loaded.runs[loaded.runs.concurrency == 8]
    assert _same(shown["out tok/s"]["bench.report"], f"{c8.output_throughput.mean():.6f}")
    assert _same(shown["peak MiB"]["console"], f"{c8.peak_rss_mib.max():.6f} RSS")


# ---- a change matches the values beside it -----------------------------------------------


@dataclass(frozen=True)
class Pair:
    """Two builds whose load times, throughputs, latencies and memory differ, compared."""

    base: Path
    cand: Path
    printed: str  # compare's console table
    md: str  # its report.md


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    root = tmp_path_factory.mktemp("pair")
    base = _store_build(root, "base", load_times=(3.154, 2.0, 4.5), seed=1)[0].dir.parent
    cand = _store_build(root, "cand", load_times=(2.986, 2.5, 3.0), seed=2)[0].dir.parent
    return Pair(base, cand, *_compare(base, cand, root / "compare"))


def _change_matches(baseline: str, candidate: str, delta: str) -> bool:
    """Whether `delta` ("-5.3%", "-5.3% [-9.0, 1.2]") is candidate / baseline - 1 of the two
    values as shown, within their rounding."""
    (b, hb), (c, hc), (d, hd) = _value(baseline), _value(candidate), _value(delta)
    low, high = (c - hc) / (b + hb) - 1.0, (c + hc) / (b - hb) - 1.0
    return low * 100.0 - hd <= d <= high * 100.0 + hd


def test_every_change_in_compares_report_is_the_ratio_of_the_values_beside_it(
    pair: Pair,
) -> None:
    checked, wrong = [], []
    for header, *rows in markdown.tables(pair.md):
        delta = next((i for i, h in enumerate(header) if h.startswith("Δ")), None)
        if delta is None:
            continue
        for row in rows:
            if row[delta] == "–":
                continue
            checked.append(row)
            if header[1].startswith("candidate / "):  # the geomean table: "×0.924" and its Δ
                (ratio, half), (d, hd) = _value(row[1]), _value(row[delta])
                matches = abs((ratio - 1.0) * 100.0 - d) <= half * 100.0 + hd
            else:
                matches = _change_matches(row[delta - 2], row[delta - 1], row[delta])
            if not matches:
                wrong.append(row)
    assert wrong == []
    assert any(row[0] == "server start" for row in checked)
    assert any(row[0].startswith("↓ load time") for row in checked)  # the geomean table's
    assert any(row[1] == "RSS" for row in checked)  # the memory table's


def test_the_load_time_row_shows_the_geomeans_whose_ratio_is_its_change(pair: Pair) -> None:
    rows = [r for t in markdown.tables(pair.md) for r in t if r[0] == "server start"]
    assert rows
    b, c = math.prod((3.154, 2.0, 4.5)) ** (1 / 3), math.prod((2.986, 2.5, 3.0)) ** (1 / 3)
    for row in rows:
        assert _same(row[2], f"{b:.6f}") and _same(row[3], f"{c:.6f}")
        assert _change_matches(row[2], row[3], row[4])
    (line,) = [line for line in pair.printed.splitlines() if "server start" in line]
    cells = [cell.strip() for cell in line.split("│")[1:-1]]
    assert _change_matches(cells[2], cells[3], cells[4])


# ---- the peak-memory figure draws the memory table ---------------------------------------


def test_the_peak_memory_figure_draws_the_memory_tables_values(pair: Pair) -> None:
    (memory,) = [rows for header, *rows in markdown.tables(pair.md) if header[1] == "memory"]
    table = {row[0]: (row[2], row[3]) for row in memory}

    builds = []
    for label, side in (("baseline", pair.base), ("candidate", pair.cand)):
        loaded = [store.load(d) for d in sorted(side.iterdir())]
        runs = pd.concat([x.runs for x in loaded], ignore_index=True)
        requests = pd.concat([x.requests for x in loaded], ignore_index=True)
        builds.append(Build(label, runs, requests))
    ax = figures._peak_memory_figure(builds).axes[0]
    ticks = [t.get_text().split("\n") for t in ax.get_xticklabels()]
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 2 * len(ticks)
    drawn = {}
    for i, (scenario, load) in enumerate(ticks):
        (name,) = [n for n in table if n.split()[0] == scenario and n.endswith(f" {load}")]
        drawn[name] = (heights[i], heights[len(ticks) + i])
    assert set(drawn) == set(table)
    for name, shown in table.items():
        assert all(_same(s, f"{h:.6f}") for s, h in zip(shown, drawn[name], strict=True)), name


# ---- one label ---------------------------------------------------------------------------


def test_a_level_has_one_label_in_the_config_and_in_results() -> None:
    for users, rate in ((8, None), (8, 2.5), (None, 2.0)):
        run = run_record(scenario="s", concurrency=users, request_rate=rate)
        (level,) = levels_of(to_table([run], RUNS_SCHEMA).to_pandas())
        assert level.label == LoadLevel(0, 64, 128, users, rate).label
        assert level.name == f"s {level.label}"
    assert LoadLevel(0, 64, 128, 8, 2.5).label == "64/128 2.5/s ≤8"
