"""Reports in Markdown and HTML: an A/B comparison (a pull-request comment) or one build.

Each report is built once as a list of blocks (heading, paragraph, table, ...) and rendered
twice, so report.md and report.html cannot say different things. report.md links the PNG
figures written next to it; report.html embeds them, so it is one file that can be archived
or mailed on its own.

`python -m bench.report run=DIR [run=DIR ...]` writes the report of one build (see --help).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf.errors import OmegaConfBaseException

from bench import store
from bench.capacity import read as read_capacity
from bench.comparison import (
    INTERLEAVED,
    CapacityAnswer,
    CapacityPair,
    Comparison,
    MachineSpeed,
    Metric,
    Row,
    Side,
)
from bench.diagnose import evidence_text, not_evaluated_lines
from bench.diagnosis import Diagnosis, diagnose
from bench.environment import versions
from bench.figures import Build, all_figures, frontier, timeline
from bench.levels import LevelStats, level_stats
from bench.stats import (
    MIN_MW_SAMPLES,
    MIN_REPEATS,
    Verdict,
    min_samples_for_quantile,
    session_sd_family,
)

# ---- blocks ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str
    strong: bool = False
    small: bool = False  # footnotes and captions


@dataclass(frozen=True)
class Alert:
    """A warning box that must not be missed: GitHub's [!WARNING] alert in Markdown."""

    title: str
    items: list[str]


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]
    marked: list[bool] = field(default_factory=list)  # per row: bold, highlighted (regressions)
    text_columns: int = 2  # the leading columns are names (left-aligned); the rest are numbers


@dataclass(frozen=True)
class Details:
    """Folded away: for the full tables a PR comment should not show at first sight."""

    summary: str
    blocks: list[Block]


@dataclass(frozen=True)
class Image:
    path: Path  # the PNG, embedded into HTML
    href: str  # the same file relative to report.md
    alt: str


Block = Heading | Para | Alert | Bullets | Table | Details | Image

# ---- Markdown ----------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*|])")
# A bracket is markup only as part of a link, an image or a link definition: "](", "][", "]:".
# Elsewhere, as in "[-15.1, -9.4]", it stays unescaped so that the raw text reads well.
_MD_LINK = re.compile(r"\](?=[(\[:])")
# GFM emphasises with _ only at word boundaries; escaping it inside words would litter names
# such as short_qa in the raw text of a comment.
_MD_UNDERSCORE = re.compile(r"(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")


def _md(text: str) -> str:
    """Text as literal Markdown: no markup, no raw HTML, safe inside a table cell."""
    text = html.escape(text, quote=False).replace("\n", " ")
    text = _MD_LINK.sub(r"\\]", _MD_SPECIAL.sub(r"\\\1", text))
    return _MD_UNDERSCORE.sub(r"\\_", text)


def _md_table(t: Table) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    align = [":---" if i < t.text_columns else "---:" for i in range(len(t.header))]
    lines = [line([_md(h) for h in t.header]), line(align)]
    for i, row in enumerate(t.rows):
        strong = i < len(t.marked) and t.marked[i]
        lines.append(line([f"**{_md(c)}**" if strong and c else _md(c) for c in row]))
    return "\n".join(lines)


def _md_block(b: Block) -> str:
    match b:
        case Heading(text, level):
            return "#" * level + " " + _md(text)
        case Para(text, strong, small):
            out = _md(text)
            return f"**{out}**" if strong else f"<sub>{out}</sub>" if small else out
        case Alert(title, items):
            return "\n".join(
                ["> [!WARNING]", f"> **{_md(title)}**", *(f"> - {_md(i)}" for i in items)]
            )
        case Bullets(items):
            return "\n".join(f"- {_md(i)}" for i in items)
        case Table():
            return _md_table(b)
        case Details(summary, blocks):
            # Blank lines around the body: GitHub renders Markdown inside <details> only then.
            inner = "\n\n".join(_md_block(x) for x in blocks)
            return f"<details><summary>{html.escape(summary)}</summary>\n\n{inner}\n\n</details>"
        case Image(_, href, alt):
            return f"![{_md(alt)}]({href})"
    raise TypeError(f"not a block: {b!r}")


def markdown(blocks: Sequence[Block]) -> str:
    return "\n\n".join(_md_block(b) for b in blocks) + "\n"


# ---- HTML --------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.5 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #1f2328;
  padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.marked td { background: #ffebe9; font-weight: 600; }
.alert { border-left: 4px solid #9a6700; background: #fff8c5; padding: 0.5em 1em; }
.small { font-size: 12px; color: #59636e; }
summary { cursor: pointer; font-weight: 600; margin: 0.5em 0; }
img { max-width: 100%; }
"""


def _h(text: str) -> str:
    return html.escape(text, quote=True)


def _html_table(t: Table) -> str:
    def cells(row: Sequence[str], tag: str) -> str:
        attr = [
            ' class="num"' if tag == "td" and i >= t.text_columns else "" for i in range(len(row))
        ]
        return "".join(f"<{tag}{a}>{_h(c)}</{tag}>" for a, c in zip(attr, row, strict=True))

    body = []
    for i, row in enumerate(t.rows):
        marked = ' class="marked"' if i < len(t.marked) and t.marked[i] else ""
        body.append(f"<tr{marked}>{cells(row, 'td')}</tr>")
    return (
        f"<table><thead><tr>{cells(t.header, 'th')}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _html_block(b: Block) -> str:
    match b:
        case Heading(text, level):
            return f"<h{level}>{_h(text)}</h{level}>"
        case Para(text, strong, small):
            inner = f"<strong>{_h(text)}</strong>" if strong else _h(text)
            return f'<p class="small">{inner}</p>' if small else f"<p>{inner}</p>"
        case Alert(title, items):
            lis = "".join(f"<li>{_h(i)}</li>" for i in items)
            return f'<div class="alert"><p><strong>{_h(title)}</strong></p><ul>{lis}</ul></div>'
        case Bullets(items):
            return "<ul>" + "".join(f"<li>{_h(i)}</li>" for i in items) + "</ul>"
        case Table():
            return _html_table(b)
        case Details(summary, blocks):
            inner = "\n".join(_html_block(x) for x in blocks)
            return f"<details><summary>{_h(summary)}</summary>\n{inner}\n</details>"
        case Image(path, _, alt):
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            return f'<figure><img alt="{_h(alt)}" src="data:image/png;base64,{data}"></figure>'
    raise TypeError(f"not a block: {b!r}")


def _html_page(title: str, blocks: Sequence[Block]) -> str:
    body = "\n".join(_html_block(b) for b in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_h(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n"
        "</html>\n"
    )


# ---- numbers -----------------------------------------------------------------------------


def _num(value: float | None) -> str:
    """Three significant digits, but whole numbers from 100 up: 12.3, 0.456, 1,234."""
    if value is None or not math.isfinite(value):
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    # "#" keeps trailing zeros (61.0, not 61); 99.96 rounds to "100." and loses the point.
    return f"{value:#.3g}".rstrip(".")


def _pct(ratio: float, low: float = math.nan, high: float = math.nan) -> str:
    """A ratio as a change in percent, with its interval when there is one: -12.3% [-15.1, -9.4]."""
    if not math.isfinite(ratio):
        return "–"

    def change(r: float) -> float:
        return round((r - 1) * 100, 1) + 0.0  # + 0.0: no "-0.0"

    out = f"{change(ratio):+.1f}%"
    if math.isfinite(low) and math.isfinite(high):
        out += f" [{change(low):.1f}, {change(high):.1f}]"
    return out


def _p(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


_VERDICT: dict[Verdict, str] = {"better": "better ✅", "worse": "worse ❌", "~": "~"}


def _verdict(r: Row) -> str:
    """The row's verdict; "~*" where the machine's own change of speed took it (drift_rule)."""
    return _VERDICT[r.verdict] + ("*" if r.note else "")


def verdict_rule(c: Comparison) -> str:
    """What the verdicts mean at this comparison's alpha and noise threshold (the rule of
    `stats.verdict`), in one wording for the reports and the console."""
    return (
        f"better / worse: Holm-adjusted p < {c.alpha:g} and a change beyond the "
        f"±{c.threshold * 100:g}% noise threshold; ~: not significant, within the threshold, "
        "or too few runs to test"
    )


def drift_rule(c: Comparison) -> str:
    """What the machine's own change of speed did to the verdicts (bench.compare's
    `_within_machine_drift`), in one wording for the reports and the console; "" without
    speed probes, and for interleaved builds, which share the machine's moves."""
    if c.machine is None or c.mode == INTERLEAVED:
        return ""
    return (
        f"a verdict also needs the change's interval beyond the machine's own change of speed, "
        f"±{c.machine.drift:.1%} ({c.machine.cause}, by the speed probe); ~*: significant but "
        "within it, so it cannot be told from the machine"
    )


def _answer(a: CapacityAnswer) -> str:
    if a.capacity is None:
        return "none"
    high = "∞" if a.high is None else f"{a.high:g}"
    low = "0" if a.low is None else f"{a.low:g}"
    return f"{a.capacity:g} [{low}-{high}]"


def capacity_line(pair: CapacityPair) -> str:
    """Both builds' capacities with their intervals (one per session) and the verdict, in one
    wording for the reports and the console."""

    def side(answers: list[CapacityAnswer]) -> str:
        return ", ".join(_answer(a) for a in answers)

    verdict = {
        "better": "higher: every candidate interval lies above the baseline's",
        "worse": "lower: every candidate interval lies below the baseline's",
        "~": "no change shown: the intervals overlap",
    }[pair.verdict]
    return (
        f"capacity ({pair.unit}) at {pair.objectives}: baseline {side(pair.baseline)}, "
        f"candidate {side(pair.candidate)}: {verdict}"
    )


def probe_cells(m: MachineSpeed) -> tuple[str, str, str]:
    """The speed probe's figures of each build (the candidate's with its ratio to the
    baseline's), and how much the machine's speed moved, in words."""
    base = " · ".join(f"{f.label} {_num(f.baseline)} {f.unit}" for f in m.figures)
    cand = " · ".join(f"{f.label} {_num(f.candidate)} {f.unit} (×{f.ratio:.3f})" for f in m.figures)
    shown = [f.label for f in m.figures if not f.gates]
    moved = (
        f"drift ±{m.drift:.1%} ({m.cause}): between the builds ±{m.between:.1%}, before → after "
        f"±{m.within[0]:.1%} (baseline) and ±{m.within[1]:.1%} (candidate)"
    )
    if shown:
        moved += f"; {', '.join(shown)} shown only (not what the engine runs on)"
    return base, cand, moved


def _metric(m: Metric) -> str:
    """The metric with the direction that is better: "↓ TTFT p99 ms (geomean of runs)"."""
    arrow = "↑" if m.higher_is_better else "↓"
    return f"{arrow} {m.name}"


_FIGURE_TITLES = {
    "ttft_cdf": "TTFT CDF",
    "e2e_cdf": "E2E latency CDF",
    "vs_concurrency": "TTFT and output throughput against load",
    "peak_memory": "Peak memory",
    "itl": "ITL distribution",
    "frontier": "Capacity search: output throughput against per-user speed, per probe",
    "timeline": "Telemetry timeline",
    "ttft_by_group_position": "TTFT by position in a group: a shared prefix, or a conversation",
}


def _figure_blocks(figures: dict[str, Path], out_dir: Path) -> list[Block]:
    images: list[Block] = [
        Image(p, p.relative_to(out_dir).as_posix(), _FIGURE_TITLES.get(name, name))
        for name, p in figures.items()
    ]
    note = (
        "The figures are PNG files next to report.md: they show when this directory is viewed "
        "on GitHub, and report.html embeds them. A pull-request comment cannot embed local "
        "images, so there they appear as links."
    )
    return [Heading("Figures"), *images, Para(note, small=True)]


def _write(
    title: str, blocks: list[Block], figures: dict[str, Path], out_dir: Path
) -> dict[str, Path]:
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(markdown(blocks), encoding="utf-8")
    page.write_text(_html_page(title, blocks), encoding="utf-8")
    return {"md": md, "html": page, **figures}


# ---- A/B comparison ----------------------------------------------------------------------

# Shown for every level in the compact table, changed or not: what a reviewer asks first.
_KEY_COLUMNS = ("output_throughput", "ttft_ms_p50", "ttft_ms_p99")
_QUANTILE_NAMES = {"ttft_ms": "TTFT", "e2e_ms": "E2E", "itl_ms": "ITL"}


def _time(iso: str) -> str:
    """An ISO 8601 time to the second, in UTC: 2026-11-22 21:56:14 UTC."""
    try:
        return pd.Timestamp(iso).tz_convert("UTC").strftime("%Y-%m-%d %H:%M:%S UTC")
    except (ValueError, TypeError):  # not a time, or one without a zone: show it as written
        return iso


def _commit(side: Side) -> str:
    if side.git_commit is None:
        return "unknown"
    return side.git_commit[:12] + (" (dirty)" if side.git_dirty else "")


def _earlier(baseline: Side, candidate: Side) -> str:
    """How long before the candidate the baseline started, " (12 days earlier)", or ""."""
    try:
        gap = pd.Timestamp(candidate.started_at) - pd.Timestamp(baseline.started_at)
    except (ValueError, TypeError):  # not times, or one without a zone
        return ""
    days, hours = gap.days, int(gap.total_seconds() // 3600)
    if days >= 1:
        return f" ({days} day{'s' * (days != 1)} earlier)"
    return f" ({hours} hour{'s' * (hours != 1)} earlier)" if hours >= 1 else ""


def _sides_table(c: Comparison) -> Table:
    b, k = c.baseline, c.candidate
    behind = "unknown" if b.commits_behind is None else f"{b.commits_behind:,}"
    rows = [
        ["source", b.source, k.source],
        ["model", b.model, k.model],
        ["target", b.target_kind, k.target_kind],
        ["engine knobs", b.engine or "defaults", k.engine or "defaults"],
        ["kernels", b.kernels or "not reported", k.kernels or "not reported"],
        ["git commit", _commit(b), _commit(k)],
        ["commits behind the candidate", behind, "–"],
        ["machine", b.hardware_key, k.hardware_key],
        ["started", _time(b.started_at) + _earlier(b, k), _time(k.started_at)],
        ["run directories", str(len(b.run_dirs)), str(len(k.run_dirs))],
    ]
    if c.machine is not None:
        m = c.machine
        base, cand, _ = probe_cells(m)
        rows.append(["machine speed (probe)", base, cand])
        within = [f"±{x:.1%} before → after" for x in m.within]
        within[1] += f"; ±{m.between:.1%} from the baseline's"
        rows.append(["machine speed drift", *within])
    return Table(["", b.label, k.label], rows, text_columns=3)


def _row_cells(r: Row) -> list[str]:
    t = r.test
    delta = "–" if t is None else _pct(t.ratio, t.ci_low, t.ci_high)
    geomeans = [_num(r.baseline_geomean), _num(r.candidate_geomean)]
    return [r.where, _metric(r.metric), *geomeans, delta]


def _compact_table(c: Comparison) -> Table:
    rows = [
        r
        for r in c.rows
        if r.verdict != "~" or r.regression or r.note or r.metric.column in _KEY_COLUMNS
    ]
    header = ["level", "metric", c.baseline.label, c.candidate.label, "Δ [CI]", "p (adj.)"]
    header.append("verdict")
    cells = [[*_row_cells(r), _p(r.p_adjusted), _verdict(r)] for r in rows]
    return Table(header, cells, [r.regression for r in rows])


def _full_table(c: Comparison) -> Table:
    header = ["level", "metric", c.baseline.label, c.candidate.label, "Δ [CI]", "runs"]
    header += ["p t-test", "p Mann-Whitney", "p (adj.)", "gate", "verdict"]
    cells = []
    for r in c.rows:
        t = r.test
        # The test's counts are of the values it used (NaN dropped); without a test, all.
        runs = f"{t.n_baseline}/{t.n_candidate}" if t else f"{len(r.baseline)}/{len(r.candidate)}"
        tests = ["–", "–"] if t is None else [_p(t.p_welch), _p(t.p_mannwhitney)]
        verdict = _verdict(r) + (" (fails gate)" if r.regression else "")
        cells.append([*_row_cells(r), runs, *tests, _p(r.p_adjusted), f"{r.gate:.0%}", verdict])
    return Table(header, cells, [r.regression for r in c.rows])


def _quantile_table(c: Comparison) -> Table:
    header = ["level", "metric", c.baseline.label, c.candidate.label, "Δ [CI]", "samples"]
    cells = []
    for q in c.quantiles:
        # The level statistic (bench/levels.py): the console's and bench.report's number.
        name = f"↓ {_QUANTILE_NAMES.get(q.column, q.column)} p{q.q * 100:g} ms"
        samples = f"{q.samples[0]:,}/{q.samples[1]:,}"
        if min(q.samples) < min_samples_for_quantile(q.q):
            samples += " (too few)"
        delta = _pct(q.ratio, q.ci_low, q.ci_high)
        cells.append([q.level.name, name, _num(q.baseline), _num(q.candidate), delta, samples])
    return Table(header, cells)


def _memory_table(c: Comparison) -> Table:
    b, k = c.baseline.label, c.candidate.label
    header = ["level", "memory", f"{b} peak MiB", f"{k} peak MiB", "Δ", "verdict"]
    cells = []
    for m in c.memory:
        values = [_num(m.baseline_mib), _num(m.candidate_mib), _pct(1.0 + m.delta_pct / 100.0)]
        cells.append([m.level.name, m.kind, *values, _VERDICT[m.verdict]])
    return Table(header, cells)


def _geomean_table(c: Comparison) -> Table:
    cells = [[_metric(g.metric), f"×{g.ratio:.3f}", _pct(g.ratio)] for g in c.geomeans]
    ratio = f"{c.candidate.label} / {c.baseline.label}"
    return Table(["metric", ratio, "Δ"], cells, text_columns=1)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _method_bullets(c: Comparison, tested: int) -> list[str]:
    """How the builds were measured (mode) and tested (test, method), from the rows' tests."""
    tests = [r.test for r in c.rows if r.test is not None]
    b, k = c.baseline.sessions, c.candidate.sessions
    if c.mode == INTERLEAVED:
        mode = f"mode: {c.mode}, {_count(k, 'round')}"
    else:
        mode = f"mode: {c.mode}, {_count(b, 'session')}"
        mode += f" (candidate: {_count(k, 'session')})" if k != 1 else ""
    kinds = []
    if any(t.sessions is None for t in tests):
        kinds.append("Welch on per-run values (log scale)")
    measured = [t.sessions for t in tests if t.sessions and t.default_session_sd is None]
    if measured and all(cand == 1 for _, cand in measured):
        kinds.append(
            "candidate session vs the baseline's sessions (prediction interval, between-session "
            "spread estimated)"
        )
    elif measured:
        kinds.append("Student's t on both builds' session means (between-session spread estimated)")
    defaults = {
        session_sd_family(r.metric.column): r.test.default_session_sd
        for r in c.rows
        if r.test is not None and r.test.default_session_sd is not None
    }
    if defaults:
        used = ", ".join(f"{sd * 100:.3g}% ({family})" for family, sd in defaults.items())
        kinds.append(
            "candidate session vs baseline session; between-session noise not measured for this "
            f"baseline: default of {used} used (a baseline of several sessions measures it)"
        )
    if any(t.p_mannwhitney is not None for t in tests):
        check = "Mann-Whitney U as a check"
    elif any(t.sessions for t in tests):
        check = f"Mann-Whitney U skipped: it needs {MIN_MW_SAMPLES} sessions per side"
    else:
        check = f"Mann-Whitney U skipped: it needs {MIN_MW_SAMPLES} runs per side"
    method = (
        f"Holm-Bonferroni across {tested} comparisons, alpha {c.alpha:g}, noise threshold "
        f"{c.threshold * 100:g}%; {check}."
    )
    return [mode, "test: " + "; ".join(kinds or ["none (too few values)"]), f"method: {method}"]


def _comparison_blocks(c: Comparison, figures: dict[str, Path], out_dir: Path) -> list[Block]:
    counts = c.counts()
    tested = sum(math.isfinite(r.p_adjusted) for r in c.rows)
    blocks: list[Block] = [Heading(f"Performance: {c.candidate.source} vs {c.baseline.source}", 1)]
    if c.mismatches:
        blocks.append(
            Alert(
                "The builds are not comparable in these respects. They were compared anyway "
                "(allow_mismatch=true), so differences below may come from these, not the change:",
                c.mismatches,
            )
        )
    blocks.append(
        Para(f"{counts['better']} improved · {counts['worse']} regressed · {counts['~']} unchanged")
    )
    failing = c.regressions
    blocks.append(
        Para(
            f"❌ {len(failing)} regression{'s' * (len(failing) != 1)} beyond the gate: "
            "this comparison fails (bold rows)."
            if failing
            else "✅ nothing got worse beyond its gate.",
            strong=True,
        )
    )
    if c.capacity is not None:
        fell = " ❌ this comparison fails." if c.capacity.verdict == "worse" else ""
        line = capacity_line(c.capacity)
        blocks.append(Para(line[0].upper() + line[1:] + fell, strong=True))
    blocks += [
        _sides_table(c),
        Bullets(_method_bullets(c, tested)),
        Heading("Changes, and throughput and TTFT at every level"),
        _compact_table(c),
        Para(
            "Values are geometric means of the runs' own values (load time: of the server "
            "starts); Δ is their ratio as a change, with its confidence interval; p is adjusted "
            f"for the number of comparisons. {verdict_rule(c)}"
            + (f"; {drift_rule(c)}." if c.machine is not None else "."),
            small=True,
        ),
    ]
    if c.geomeans:
        blocks += [Heading("Geometric mean over levels"), _geomean_table(c)]
    blocks.append(Details(f"All {len(c.rows)} comparisons", [_full_table(c)]))
    if c.quantiles:
        note = Para(
            "Per-request quantiles: every successful request of every run of the level pooled, "
            "as the console and bench.report show them, with hierarchical bootstrap intervals "
            "(runs, then requests). Diagnostics, not tests: they give no verdict.",
            small=True,
        )
        blocks.append(
            Details(f"Per-request quantiles ({len(c.quantiles)})", [note, _quantile_table(c)])
        )
    if c.memory:
        note = Para(
            "Peak MiB as the console and bench.report show it: the maximum over the level's runs "
            "of the GPU total (NVML), else of the server's RSS. Compared exactly, with a small "
            "tolerance for allocator noise.",
            small=True,
        )
        blocks.append(Details(f"Peak memory ({len(c.memory)})", [note, _memory_table(c)]))
    blocks += _figure_blocks(figures, out_dir)
    if c.warnings:
        blocks += [Heading("Warnings"), Bullets(c.warnings)]
    return blocks


def write_comparison_report(
    comparison: Comparison,
    builds: Sequence[Build],
    out_dir: Path,
    diagnosis: Diagnosis | None = None,
) -> dict[str, Path]:
    """report.md (for a pull-request comment), report.html and the figures, into out_dir;
    `diagnosis`: the candidate's, as a collapsed section (why it was not faster).

    Returns {"md": ..., "html": ..., <figure name>: ...}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = all_figures(builds, out_dir)
    blocks = _comparison_blocks(comparison, figures, out_dir)
    if diagnosis is not None:
        found = len(diagnosis.findings)
        title = f"Diagnosis of the candidate: {found} finding{'s' * (found != 1)}"
        blocks.append(Details(title, _diagnosis_blocks(diagnosis)[1:]))
    title = f"{comparison.candidate.source} vs {comparison.baseline.source}"
    return _write(title, blocks, figures, out_dir)


# ---- one build ---------------------------------------------------------------------------


class ReportError(ValueError):
    """Bad input to the report: says what was wrong and what to pass instead."""


def _none_if_nan(value: Any) -> Any:
    return None if value is None or bool(pd.isna(value)) else value


def _ttft_p99(s: LevelStats) -> float:
    """The level's TTFT p99 (pooled); infinite without a successful request."""
    return math.inf if s.ttft_ms.p99 is None else s.ttft_ms.p99


def capacity(stats: Sequence[LevelStats], slo_ttft_ms: float) -> list[str]:
    """Per sweep: the highest load level whose TTFT p99 (every request of the level) meets
    the SLO.

    A lower level that misses it is named: the sweep is then not monotone (noise, or a level
    that hit a slow path), and the capacity deserves a second look.
    """
    sweeps: dict[tuple[str, int, int, bool], list[LevelStats]] = {}
    for s in stats:
        sweeps.setdefault(s.level.sweep, []).append(s)
    lines = []
    for (scenario, n_in, n_out, _), sweep in sweeps.items():
        head = f"Capacity at TTFT p99 ≤ {slo_ttft_ms:g} ms"
        sweep = sorted(sweep, key=lambda s: s.level.x)
        meets = [_ttft_p99(s) <= slo_ttft_ms for s in sweep]  # no success never meets
        if not any(meets):
            best = min(sweep, key=_ttft_p99)
            lines.append(
                f"{head} ({scenario} {n_in}/{n_out}): none of the measured levels meets it "
                f"(lowest TTFT p99: {_num(best.ttft_ms.p99)} ms at {best.level.in_words})"
            )
            continue
        top = max(i for i, ok in enumerate(meets) if ok)
        line = f"{head}: {sweep[top].level.in_words} ({scenario} {n_in}/{n_out})"
        if top == len(sweep) - 1:
            which = "only" if len(sweep) == 1 else "highest"
            line += f"; the {which} level measured, so the capacity may be higher"
        missed = [s.level for s, ok in zip(sweep[:top], meets[:top], strict=True) if not ok]
        if missed:
            names = ", ".join(lv.in_words for lv in missed)
            line += f"; but {names}, below it, miss{'es' * (len(missed) == 1)} it"
        if sweep[top].failed:
            line += f"; {sweep[top].failed} requests failed at that level"
        lines.append(line)
    return lines


def _share(j: Mapping[str, Any]) -> str:
    """A probe's share of requests missing an objective, with its interval."""
    return f"{j['share']:.1%} [{j['share_low']:.1%}, {j['share_high']:.1%}]"


def _probe_table(saved: Mapping[str, Any]) -> Table:
    """Every probe of a capacity search: its load, what it measured and its verdict."""
    header = ["load", "rounds", "requests"]
    for j in saved["probes"][0]["objectives"]:
        unit = "" if j["label"] == "success" else " ms"
        header += [j["label"] + unit, f"missed {j['objective']} [CI]"]
    header += ["verdict", "goodput req/s", "out tok/s", "tok/s per user"]
    rows, marked = [], []
    for probe in saved["probes"]:
        row = [f"{probe['load']:g}", str(probe["rounds"]), str(probe["requests"])]
        for j in probe["objectives"]:
            value = j["value"]
            shown = (
                "–" if value is None else f"{value:.1%}" if j["label"] == "success" else _num(value)
            )
            row += [shown, _share(j)]
        row += [
            str(probe["verdict"]),
            _num(probe["goodput"]),
            _num(probe["output_throughput"]),
            _num(probe["tokens_per_user"]),
        ]
        rows.append(row)
        marked.append(probe["load"] == saved["capacity"])
    return Table(header, rows, marked)


def _capacity_blocks(
    dirs: Sequence[Path], stats: Sequence[LevelStats], slo_ttft_ms: float, out_dir: Path
) -> tuple[list[Block], dict[str, Path]]:
    """A capacity search's answer and probes (capacity.json) where the runs searched; else
    the capacity a sweep's levels show at `slo_ttft_ms`."""
    searches = [(d.name, saved) for d in dirs if (saved := read_capacity(d)) is not None]
    if not searches:
        return [Para(line, strong=True) for line in capacity(stats, slo_ttft_ms)], {}
    blocks: list[Block] = []
    for name, saved in searches:
        status = "" if saved["complete"] else " (the search stopped early: partial)"
        blocks += [Para(str(saved["text"]) + status, strong=True)]
        blocks += [Bullets([f"note: {n}" for n in saved["notes"]])] if saved["notes"] else []
        blocks += [
            Details(f"Capacity search of {name}: {len(saved['probes'])} probes", [
                _probe_table(saved),
                Para(
                    "An objective on a percentile holds when at most the rest of the requests "
                    "miss it (p99: 1%); a failed request misses every objective. Missed: the "
                    f"share of requests that did, with its {saved['confidence']:.0%} "
                    "Clopper-Pearson interval; meets / misses: certain at that confidence, "
                    "uncertain otherwise. The capacity's row is bold. Goodput: requests/s "
                    "meeting every objective; tok/s per user: 1000 / TPOT p50.",
                    small=True,
                ),
            ])
        ]  # fmt: skip
    figure = frontier([(n, s["probes"]) for n, s in searches], out_dir / "frontier.png")
    return blocks, {"frontier": figure}


def _summary_table(stats: Sequence[LevelStats]) -> Table:
    """The level statistics under the names the console uses (bench/levels.py); TTFO only
    where some request streamed reasoning before its answer."""
    ttfo = any(s.has_ttfo for s in stats)
    header = ["level", "runs", "out tok/s", "± sd", "TTFT p50 ms", "TTFT p99 ms"]
    header += ["TTFO p50 ms", "TTFO p99 ms"] if ttfo else []
    header += ["TPOT p50 ms", "ITL p50 ms", "E2E p50 ms", "success", "peak MiB"]
    rows = []
    for s in stats:
        peak = s.peak_memory
        mem = "–" if peak is None else f"{_num(peak.mib)} {peak.kind}"
        rate = s.success_rate
        success = "–" if math.isnan(rate) else "100%" if rate == 1.0 else f"{rate:.1%}"
        rows.append(
            [
                s.level.name,
                str(s.repeats),
                _num(s.output_throughput.mean),
                _num(s.output_throughput.sd),
                _num(s.ttft_ms.p50),
                _num(s.ttft_ms.p99),
                *([_num(s.ttfo_ms.p50), _num(s.ttfo_ms.p99)] if ttfo else []),
                _num(s.tpot_ms.p50),
                _num(s.itl_ms.p50),
                _num(s.e2e_ms.p50),
                success,
                mem,
            ]
        )
    return Table(header, rows, [s.success_rate < 1.0 for s in stats], text_columns=1)


def _distinct(runs: pd.DataFrame, column: str) -> str:
    values = [str(v) for v in runs[column].dropna().unique()]
    return ", ".join(values) if values else "unknown"


# The versions a one-build report names: those that most often move an engine's speed.
_SOFTWARE = ("Python", "torch", "transformers", "llm-serving-bench", "GPU driver", "CUDA driver")


def _environment(runs: pd.DataFrame, run_ids: Sequence[str]) -> Bullets:
    commits = runs[["git_commit", "git_dirty"]].drop_duplicates()
    commit = ", ".join(
        "unknown" if _none_if_nan(c) is None else str(c)[:12] + (" (dirty)" if d is True else "")
        for c, d in commits.itertuples(index=False)
    )
    found = versions(*(json.loads(str(e)) for e in runs["environment_json"].dropna().unique()))
    software = ", ".join(f"{name} {found[name]}" for name in _SOFTWARE if name in found)
    return Bullets(
        [
            f"runs: {', '.join(run_ids)}",
            f"model: {_distinct(runs, 'model')}",
            f"target: {_distinct(runs, 'target_kind')} ({_distinct(runs, 'endpoint')} endpoint)",
            f"machine: {_distinct(runs, 'hardware_key')}",
            f"client: {_client(runs)}",
            f"software: {software or 'unknown'}",
            f"git commit: {commit}",
            f"started: {_time(str(runs['started_at'].min()))}",
        ]
    )


def _client(runs: pd.DataFrame) -> str:
    """How many client workers sent the load and, with several, how each one kept up: its
    worst loop lag p99 and send lag p99 over the levels, and how well its clock was known."""
    counts = runs["workers"].dropna()
    most = int(counts.max()) if len(counts) else 1
    if most <= 1:
        return "one process"

    def worst(column: str) -> str:
        per_worker = [0.0] * most
        for values in runs[column].dropna():
            for w, v in enumerate(values):
                per_worker[w] = max(per_worker[w], float(v))
        return " / ".join(f"{v:.2f}" for v in per_worker)

    clock = max((max(v, default=0.0) for v in runs["worker_clock_uncertainty_ms"].dropna()),
                default=0.0)  # fmt: skip
    known = f"; clocks known to ±{clock:.2f} ms" if clock > 0 else ""
    return (
        f"{most} workers; per worker, loop lag p99 up to {worst('worker_loop_lag_ms_p99')} ms "
        f"and send lag p99 up to {worst('worker_send_lag_ms_p99')} ms{known}"
    )


def _run_warnings(stats: Sequence[LevelStats]) -> list[str]:
    out = []
    for s in stats:
        name = s.level.name
        if s.partial:
            out.append(f"{name}: {s.partial} of {s.repeats} repeats stopped early (partial)")
        if s.failed:
            out.append(f"{name}: {s.failed} requests failed; latencies are of the others")
        if s.client_bound:
            out.append(
                f"{name}: client-bound in {s.client_bound} of {s.repeats} repeats: the "
                "harness's own event loop lagged, so these latencies include client delay"
            )
        if s.repeats < MIN_REPEATS:
            out.append(
                f"{name}: {s.repeats} repeats; comparisons need at least {MIN_REPEATS} per build"
            )
    return out


def _diagnosis_blocks(diagnosis: Diagnosis) -> list[Block]:
    """bench.diagnose's findings, each with its evidence and knobs, or that none fired; and
    the rules that lacked what they read."""
    blocks: list[Block] = [Heading("Diagnosis")]
    if diagnosis.findings:
        items = [
            f"{f.level} · {f.rule}: {f.title}. {f.detail} Evidence: {evidence_text(f.evidence)}. "
            f"Knobs: {'; '.join(f.knobs)}."
            for f in diagnosis.findings
        ]
        blocks.append(Bullets(items))
    else:
        rules = ", ".join(diagnosis.rules_evaluated()) or "none"
        blocks.append(Para(f"No findings (rules evaluated: {rules})."))
    skipped = not_evaluated_lines(diagnosis)
    if skipped:
        blocks.append(Para("Not evaluated: " + "; ".join(skipped) + ".", small=True))
    return blocks


def _timelines(loaded: store.StoredRun, out_dir: Path) -> dict[str, Path]:
    """The telemetry timeline of each run: each has a clock of its own."""
    run_ids = sorted({str(r) for r in loaded.runs["run_id"]})
    if len(run_ids) == 1:
        return {"timeline": timeline(loaded, out_dir / "timeline.png")}
    out = {}
    for run_id in run_ids:
        one = store.StoredRun(
            *(f[f["run_id"] == run_id] for f in (loaded.requests, loaded.runs, loaded.telemetry))
        )
        out[f"timeline {run_id}"] = timeline(one, out_dir / f"timeline-{run_id}.png")
    return out


def write_run_report(
    run_dirs: Sequence[Path], out_dir: Path, slo_ttft_ms: float = 2000.0
) -> dict[str, Path]:
    """report.md, report.html and the figures of one build (one or more run directories)."""
    dirs = store.find_run_dirs([Path(p) for p in run_dirs])
    loaded = store.load_all(dirs)
    runs, requests = loaded.runs, loaded.requests
    if runs.empty:
        raise ReportError(f"no runs recorded in {', '.join(map(str, dirs))}")
    run_ids = [d.name for d in dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = run_ids[0] if len(run_ids) == 1 else f"{len(run_ids)} runs"
    figures = all_figures([Build(label, runs, requests)], out_dir)
    figures |= _timelines(loaded, out_dir)

    stats = level_stats(runs, requests)
    blocks: list[Block] = [Heading(f"Benchmark report: {label}", 1)]
    capacity_blocks, capacity_figures = _capacity_blocks(dirs, stats, slo_ttft_ms, out_dir)
    figures |= capacity_figures
    blocks += capacity_blocks
    blocks += [
        Heading("Results per load level"),
        _summary_table(stats),
        Para(
            "Latency percentiles are over every successful request of the level's repeats, "
            "pooled (ITL: every token gap); out tok/s is the mean over repeats ± their standard "
            "deviation; success is completed / sent over all repeats (rows with failures in "
            "bold); peak memory is the maximum over repeats of the GPU total (NVML), else of "
            "the server's process tree (RSS). TTFO, where a reasoning model streamed its "
            "thinking first: the time to the first answer token (TTFT counts either kind).",
            small=True,
        ),
        *_diagnosis_blocks(diagnose(loaded)),
        Heading("Environment"),
        _environment(runs, run_ids),
        *_figure_blocks(figures, out_dir),
    ]
    warnings = _run_warnings(stats)
    if warnings:
        blocks += [Heading("Warnings"), Bullets(warnings)]
    return _write(f"Benchmark report: {label}", blocks, figures, out_dir)


# ---- command line ------------------------------------------------------------------------


@dataclass
class _Slo:
    ttft_ms: float = 2000.0  # the capacity's objective; not the run's goodput SLO


@dataclass
class ReportArgs:
    run: list[str] = field(default_factory=list)
    report: str | None = None  # default: reports/<run_id>/
    slo: _Slo = field(default_factory=_Slo)


USAGE = """\
python -m bench.report: a Markdown and HTML report of one build's runs, with figures.

Usage:
  python -m bench.report run=PATH [run=PATH ...] [report=DIR] [slo.ttft_ms=2000]

Keys:
  run=PATH         a run directory (results_dir/<run_id>/, with runs.parquet), or a folder of
                   them; repeat run= to report several runs as one build
  report=DIR       where report.md, report.html and the figures go
                   (default: reports/<run_id>/)
  slo.ttft_ms=MS   the TTFT p99 objective the capacity is measured against (default 2000)

Example:
  python -m bench.report run=results/runs/20261122-215613-concurrency-b8a18a
"""


def _default_dir(run_dirs: Sequence[Path]) -> Path:
    name = run_dirs[0].name + (f"+{len(run_dirs) - 1}" if len(run_dirs) > 1 else "")
    return Path("reports") / name


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(argv):
        print(USAGE, end="")
        return 0
    try:
        args = store.run_arguments(argv, ReportArgs)
        if not args.run:
            raise ReportError("no run given: pass run=PATH (see --help)")
        dirs = store.find_run_dirs([Path(p) for p in args.run])
        out_dir = Path(args.report) if args.report else _default_dir(dirs)
        paths = write_run_report(dirs, out_dir, args.slo.ttft_ms)
    except OmegaConfBaseException as exc:
        # The first line says what was wrong ("Key 'foo' not in 'ReportArgs'", "Value 'x' ...
        # could not be converted to Float"); the rest is OmegaConf's internals.
        first = str(exc).splitlines()[0]
        key = getattr(exc, "full_key", None)
        where = f" (key {key})" if key else ""
        print(f"error: {first}{where}; keys are run, report, slo.ttft_ms", file=sys.stderr)
        return 2
    # ReportError; store.find_run_dirs finding no runs; store.load refusing another version
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {paths['md']}\n        {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
