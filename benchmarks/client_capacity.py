"""How many concurrent streams (and tokens/s) does the harness's client sustain per core?

The reference server is pinned to the first CPU and each client worker (client.workers) to one
of the last ones (client.pin_workers); the sweep raises the number of streaming users until
some worker's event-loop lag (p99) passes 1 ms, the point beyond which the harness starts to
add its own delay to what it measures. The server's truth log tells whether the server kept its
schedule, so a server-bound row is not blamed on the client. With as many workers as CPUs, the
server shares a CPU with a worker: the server's CPU share is printed beside each row.

    python benchmarks/client_capacity.py [--workers 1 2] [--itl-ms 5] [--users 1 8 16 32 64 128]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

from bench import runner
from bench.compose import compose
from bench.refserver import read_truth_log

LAG_LIMIT_MS = 1.0
_ALL_CPUS = os.sched_getaffinity(0)


def _start_server(cpu: int, itl_ms: float, log: Path) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "bench.refserver", "--port", "0", "--ttft-ms", "10",
           "--itl-ms", str(itl_ms), "--log-file", str(log)]  # fmt: skip
    proc = subprocess.Popen(["taskset", "-c", str(cpu), *cmd], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    match = re.match(r"READY (\S+)", proc.stdout.readline())
    if not match:
        raise RuntimeError("the reference server did not start")
    return proc, match.group(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--itl-ms", type=float, default=5.0)
    ap.add_argument("--output-tokens", type=int, default=200)
    ap.add_argument("--users", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128])
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="client.workers to try")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        sys.exit("needs two CPUs: one for the client, one for the server")
    table = Table(title=f"server on CPU {cpus[0]}; 1 worker: on CPU {cpus[-1]}; 2 workers: "
                  f"on CPU {cpus[-2]} and {cpus[-1]}, their coordinator on CPU {cpus[0]}; "
                  f"ITL {args.itl_ms} ms, {args.output_tokens} tokens per request")  # fmt: skip
    for col in ("workers", "users", "tokens/s", "events/s", "loop lag p99 ms (per worker)",
                "server ITL p50 ms", "server CPU ≤", "verdict"):  # fmt: skip
        table.add_column(col, justify="right")
    sustained: dict[int, tuple[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            for users in args.users:
                row = _measure(Path(tmp), cpus[0], workers, users, args)
                table.add_row(str(workers), str(users), *row.cells())
                if row.verdict == "ok":
                    sustained[workers] = (users, row.tokens_per_s)
            table.add_section()
    Console(width=160).print(table)
    for workers, (users, tokens) in sustained.items():
        ratio = tokens / sustained[args.workers[0]][1]
        print(f"{workers} worker(s): {users} streams, {tokens:,.0f} tokens/s sustained "
              f"({ratio:.2f}x {args.workers[0]} worker(s))")  # fmt: skip


@dataclass(frozen=True)
class _Row:
    tokens_per_s: float
    events_per_s: float
    lag_p99_ms: list[float]
    server_itl_ms: float
    server_cpu: float  # CPU-seconds per second of the level
    verdict: str

    def cells(self) -> list[str]:
        lags = " / ".join(f"{v:.3f}" for v in self.lag_p99_ms)
        return [f"{self.tokens_per_s:,.0f}", f"{self.events_per_s:,.0f}", lags,
                f"{self.server_itl_ms:.2f}", f"{self.server_cpu:.0%}", self.verdict]  # fmt: skip


def _measure(tmp: Path, server_cpu: int, workers: int, users: int, args: Any) -> _Row:
    # One worker is the coordinator's own loop, which client.pin_workers pins; several report
    # to a coordinator that only records, kept beside the server.
    os.sched_setaffinity(0, {server_cpu} if workers > 1 else _ALL_CPUS)
    log = tmp / f"truth-{workers}-{users}.jsonl"
    proc, url = _start_server(server_cpu, args.itl_ms, log)
    try:
        server = psutil.Process(proc.pid)
        overrides = [
            "target=openai", f"target.base_url={url}", f"results_dir={tmp}",
            "progress=false", "telemetry.interval_s=1.0",
            f"scenario.concurrency={users}", f"scenario.num_requests={2 * users}",
            f"scenario.output_tokens={args.output_tokens}", "scenario.repeats=1",
            "scenario.range_ratio=0.3", f"scenario.warmup_requests={users}",
            f"client.workers={workers}", "client.pin_workers=true",
        ]  # fmt: skip
        result = runner.run(compose(*overrides))
        cpu = server.cpu_times()
    finally:
        proc.terminate()
        proc.wait()
    (run,) = result.runs
    events = sum(len(r.event_ms) for r in result.requests) / run.duration_s
    true_itl = np.median([g for t in read_truth_log(log) for g in t.itl_s]) * 1e3
    lags = list(run.worker_loop_lag_ms_p99)
    if true_itl > args.itl_ms * 1.2:
        verdict = "server-bound"
    else:
        verdict = "ok" if max(lags) <= LAG_LIMIT_MS else "client-bound"
    # The server's CPU time over its whole life (warm-up included) per second of the measured
    # level: an upper bound on its share of a CPU during the level.
    busy = (cpu.user + cpu.system) / run.duration_s
    return _Row(run.output_throughput, events, lags, true_itl, busy, verdict)


if __name__ == "__main__":
    main()
