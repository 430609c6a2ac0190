"""The table printed at the end of a run: one row per load level, repeats pooled.

Its numbers are each level's statistics as every output shows them (bench/levels.py): latency
percentiles pool every request of every repeat of a level; throughput is the mean and
standard deviation over repeats, since each repeat is one independent measurement of it.

Each row is two lines: p50 above p99 for latencies, the mean above its ± sd for throughput,
which keeps the standard scenarios within 80 columns; a wider table is printed whole
(`print_whole`), never with figures cut short. A TTFO column (time to the first answer token)
follows TTFT only when some request streamed reasoning before its answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.segment import Segments
from rich.table import Table

from bench.levels import level_stats
from bench.metrics import Distribution
from bench.records import REQUESTS_SCHEMA, RUNS_SCHEMA, RequestRecord, RunRecord, to_table

# Wider than any table: measuring against it gives the table's natural width.
_UNLIMITED = 10_000


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _p50_p99(d: Distribution, digits: int) -> str:
    return f"{_fmt(d.p50, digits)}\n{_fmt(d.p99, digits)}"


def table(runs: Sequence[RunRecord], requests: Sequence[RequestRecord]) -> Table:
    """A row per level of the run."""
    stats = level_stats(
        to_table(list(runs), RUNS_SCHEMA).to_pandas(),
        to_table(list(requests), REQUESTS_SCHEMA).to_pandas(),
    )
    scenario = f"{runs[0].scenario}: " if runs else ""
    t = Table(
        title=f"{scenario}latency p50, p99 of all requests · tok/s mean ± sd of repeats",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
    )
    # no_wrap: a figure is one word, and rich would cut it rather than wrap it.
    t.add_column("in/out load", no_wrap=True)
    t.add_column("ok/sent", justify="right", no_wrap=True)
    t.add_column("", no_wrap=True)
    ttfo = any(s.has_ttfo for s in stats)
    latencies = ("TTFT\nms", *(("TTFO\nms",) if ttfo else ()), "ITL\nms", "TPOT\nms", "E2E\nms")
    for name in (*latencies, "out\ntok/s", "req/s", "peak\nMiB"):
        t.add_column(name, justify="right", no_wrap=True)
    client_bound: list[str] = []
    for s in stats:
        label = s.level.label
        peak = s.peak_memory
        if s.client_bound:
            client_bound.append(f"{label} in {s.client_bound} of {s.repeats}")
        tps = s.output_throughput
        t.add_row(
            label + ("\n[yellow]client-bound[/]" if s.client_bound else ""),
            f"{s.completed}/{s.sent}" + (f"\n[red]{s.failed} failed[/]" if s.failed else ""),
            "p50\np99",
            _p50_p99(s.ttft_ms, 1),
            *((_p50_p99(s.ttfo_ms, 1),) if ttfo else ()),
            _p50_p99(s.itl_ms, 2),
            _p50_p99(s.tpot_ms, 2),
            _p50_p99(s.e2e_ms, 0),
            f"{tps.mean:,.1f}\n± {tps.sd:,.1f}",
            f"{s.request_throughput.mean:,.2f}",
            "-" if peak is None else f"{peak.mib:,.0f} {peak.kind}",
        )
    if runs:
        run = runs[0]
        load = f"load time {run.load_time_s:.2f} s · " if run.load_time_s is not None else ""
        t.caption = (
            f"{run.model} at {run.base_url} ({run.endpoint})\n"
            f"{load}workload {run.workload_hash[:12]}"
        )
        if client_bound:
            t.caption += (
                "\nclient-bound: the harness's own event-loop lag p99 exceeded "
                f"client.lag_threshold_ms ({', '.join(client_bound)} repeats); those latencies "
                "include client delay: more client.workers split the load"
            )
    return t


def print_summary(
    runs: Sequence[RunRecord],
    requests: Sequence[RequestRecord],
    console: Console | None = None,
) -> None:
    print_whole(console or Console(), table(runs, requests))


def print_whole(console: Console, renderable: RenderableType) -> None:
    """Print at no less than the renderable's own width, so that no table column is shrunk.

    rich fits a table to the console by cutting the words that do not fit ("1,1…"); printed at
    its natural width instead, a table wider than the console keeps every figure, and a
    terminal wraps its long lines (a pipe or a log keeps them whole).
    """
    natural = Measurement.get(console, console.options.update_width(_UNLIMITED), renderable)
    options = console.options.update_width(max(console.width, natural.maximum))
    console.print(Segments(console.render(renderable, options)), crop=False)
