"""How many concurrent streams (and tokens/s) does the harness's client sustain on one core?

The client is pinned to one CPU and the reference server to another; the sweep raises the
number of streaming users until the client's own event-loop lag (p99) passes 1 ms, the point
beyond which the harness starts to add its own delay to what it measures. The server's truth
log tells whether the server kept its schedule, so a server-bound row is not blamed on the
client.

    python benchmarks/client_capacity.py [--itl-ms 5] [--users 1 8 16 32 64 128]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench import runner
from bench.compose import compose
from bench.refserver import read_truth_log

LAG_LIMIT_MS = 1.0


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
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        sys.exit("needs two CPUs: one for the client, one for the server")
    os.sched_setaffinity(0, {cpus[0]})
    table = Table(title=f"client on one core (CPU {cpus[0]}), server on CPU {cpus[1]}, "
                  f"ITL {args.itl_ms} ms, {args.output_tokens} tokens per request")  # fmt: skip
    for col in ("users", "tokens/s", "events/s", "loop lag p50 ms", "loop lag p99 ms",
                "server ITL p50 ms", "verdict"):  # fmt: skip
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for users in args.users:
            log = Path(tmp) / f"truth-{users}.jsonl"
            proc, url = _start_server(cpus[1], args.itl_ms, log)
            try:
                result = runner.run(
                    compose(
                        "target=openai",
                        f"target.base_url={url}",
                        f"results_dir={tmp}",
                        "progress=false",
                        "telemetry.interval_s=1.0",
                        f"scenario.concurrency={users}",
                        f"scenario.num_requests={2 * users}",
                        f"scenario.output_tokens={args.output_tokens}",
                        "scenario.repeats=1",
                        "scenario.range_ratio=0.3",
                        f"scenario.warmup_requests={users}",
                    )
                )
            finally:
                proc.terminate()
                proc.wait()
            (run,) = result.runs
            events = sum(len(r.event_ms) for r in result.requests) / run.duration_s
            true_itl = np.median([g for t in read_truth_log(log) for g in t.itl_s]) * 1e3
            lag99 = run.loop_lag_ms_p99 or 0.0
            if true_itl > args.itl_ms * 1.2:
                verdict = "server-bound"
            else:
                verdict = "ok" if lag99 <= LAG_LIMIT_MS else "client-bound"
            table.add_row(
                str(users), f"{run.output_throughput:,.0f}", f"{events:,.0f}",
                f"{run.loop_lag_ms_p50 or 0:.3f}", f"{lag99:.3f}", f"{true_itl:.2f}", verdict,
            )  # fmt: skip
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
