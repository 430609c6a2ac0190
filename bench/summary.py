"""The table printed at the end of a run: one row per load level, repeats pooled.

Latency percentiles pool every request of every repeat of a level; throughput is the mean and
standard deviation over repeats, since each repeat is one independent measurement of it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.config import SloConfig
from bench.metrics import summarize
from bench.records import RequestRecord, RunRecord


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(runs: Sequence[RunRecord], requests: Sequence[RequestRecord], slo: SloConfig) -> Table:
    by_level: dict[int, list[RunRecord]] = defaultdict(list)
    for r in runs:
        by_level[r.level].append(r)
    t = Table(title="results (median / p99 over all repeats; throughput mean ± sd over repeats)")
    for name in ("level", "in/out", "load", "ok/sent", "TTFT ms", "ITL ms", "TPOT ms", "E2E ms"):
        t.add_column(name, justify="right")
    t.add_column("out tok/s", justify="right")
    t.add_column("req/s", justify="right")
    t.add_column("peak mem MiB", justify="right")
    for level, level_runs in sorted(by_level.items()):
        first = level_runs[0]
        reqs = [q for q in requests if q.level == level]
        m = summarize(reqs, sum(r.duration_s for r in level_runs), slo)
        tps = np.array([r.output_throughput for r in level_runs])
        rps = np.array([r.request_throughput for r in level_runs])
        load = (
            f"c={first.concurrency}"
            if first.request_rate is None
            else f"{first.request_rate:g}/s"
            + (f" ≤{first.concurrency}" if first.concurrency else "")
        )
        gpu = [r.peak_gpu_memory_mib_total for r in level_runs if r.peak_gpu_memory_mib_total]
        rss = [r.peak_rss_mib for r in level_runs if r.peak_rss_mib]
        mem = f"{max(gpu):,.0f} GPU" if gpu else (f"{max(rss):,.0f} RSS" if rss else "-")
        bound = sum(r.client_bound for r in level_runs)
        flags = f" [yellow]client-bound {bound}/{len(level_runs)}[/]" if bound else ""
        t.add_row(
            str(level),
            f"{first.input_tokens}/{first.output_tokens}",
            load + flags,
            f"{m.completed}/{m.sent}" + (f" [red]({m.failed} failed)[/]" if m.failed else ""),
            f"{_fmt(m.ttft_ms.p50)} / {_fmt(m.ttft_ms.p99)}",
            f"{_fmt(m.itl_ms.p50, 2)} / {_fmt(m.itl_ms.p99, 2)}",
            f"{_fmt(m.tpot_ms.p50, 2)} / {_fmt(m.tpot_ms.p99, 2)}",
            f"{_fmt(m.e2e_ms.p50, 0)} / {_fmt(m.e2e_ms.p99, 0)}",
            f"{tps.mean():,.1f} ± {tps.std(ddof=1) if len(tps) > 1 else 0:,.1f}",
            f"{rps.mean():,.2f}",
            mem,
        )
    if runs:
        run = runs[0]
        load = f"load time {run.load_time_s:.2f} s · " if run.load_time_s is not None else ""
        t.caption = (
            f"{run.model} at {run.base_url} ({run.endpoint}) · {load}"
            f"workload {run.workload_hash[:12]}"
        )
        if any(r.client_bound for r in runs):
            t.caption += (
                "\nclient-bound N/M: the harness's own event-loop lag p99 exceeded "
                "client.lag_threshold_ms in N of M repeats; those latencies include client delay"
            )
    return t


def print_summary(
    runs: Sequence[RunRecord],
    requests: Sequence[RequestRecord],
    slo: SloConfig,
    console: Console | None = None,
) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough that rows do not wrap
            console = Console(width=180)
    console.print(table(runs, requests, slo))
