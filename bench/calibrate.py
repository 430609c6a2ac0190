"""`python -m bench.calibrate`: how accurately does the harness measure on this machine?

It runs the harness against the reference server, whose truth log says when each request
arrived and when each event was written, joins both sides by request id and prints the error
of every headline figure, split into where it arises:

- uplink: client send -> server handler start (client send path, loopback, the server's accept
  queue and HTTP parsing): the server's share of the TTFT error;
- downlink: server write of the first event -> client timestamp (loopback and the client's own
  event-loop delay): the client's share.

Both processes read CLOCK_MONOTONIC (time.perf_counter here, time.monotonic in the server),
so the differences are exact on one host.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench import runner
from bench.compose import compose
from bench.refserver import read_truth_log


@dataclass(frozen=True)
class Calibration:
    concurrency: int
    workers: int  # client.workers (of client.backend)
    requests: int
    recorded_once: bool  # every request the server saw is one row, and no row is twice
    ttft_p50_ms: float  # measured by the harness
    ttft_true_p50_ms: float  # logged by the server
    ttft_error_ms: float  # per request, harness TTFT - the server's: p50
    ttft_error_p99_ms: float
    itl_p50_ms: float
    itl_true_p50_ms: float
    tokens_exact: float  # share of requests whose output token count is exactly right
    uplink_p50_ms: float
    uplink_p99_ms: float
    downlink_p50_ms: float
    downlink_p99_ms: float
    loop_lag_p99_ms: float  # the worst worker's

    @property
    def itl_error_ms(self) -> float:
        return self.itl_p50_ms - self.itl_true_p50_ms


def measure(
    concurrency: int,
    num_requests: int,
    ttft_ms: float = 50.0,
    itl_ms: float = 10.0,
    tokens_per_event: int = 1,
    output_tokens: int = 64,
    range_ratio: float = 0.0,
    results_dir: Path | None = None,
    workers: int = 1,
    backend: str = "local",
) -> Calibration:
    """One closed-loop level against the reference server, compared with its truth log."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "truth.jsonl"
        cfg = compose(
            "target=refserver",
            f"results_dir={results_dir or tmp}",
            "progress=false",
            "scenario=short_qa",
            f"scenario.concurrency={concurrency}",
            f"scenario.num_requests={num_requests}",
            f"scenario.output_tokens={output_tokens}",
            "scenario.repeats=1",
            f"scenario.warmup_requests={concurrency}",
            f"+target.server_args.log-file={log}",
            f"target.server_args.ttft-ms={ttft_ms}",
            f"target.server_args.itl-ms={itl_ms}",
            f"target.server_args.tokens-per-event={tokens_per_event}",
            f"scenario.range_ratio={range_ratio}",
            f"client.workers={workers}",
            f"client.backend={backend}",
        )
        result = runner.run(cfg)
        logged = read_truth_log(log)
        truth = {t.request_id: t for t in logged}
    reqs = [r for r in result.requests if r.ok]
    ids = [r.request_id for r in result.requests]
    # The server also logged the warm-up requests, which are never recorded.
    recorded_once = len(set(ids)) == len(ids) == num_requests and set(ids) <= set(truth)
    origin = result.runs[0].monotonic_origin_s
    pairs = [(r, truth[r.request_id]) for r in reqs]
    uplink = [(t.received - (origin + r.sent_s)) * 1e3 for r, t in pairs]
    downlink = [((origin + (r.first_token_s or 0.0)) - t.event_writes[0]) * 1e3 for r, t in pairs]

    def p(values: Sequence[float], q: float) -> float:
        return float(np.percentile(values, q))

    ttft_error = [(r.ttft_ms or 0.0) - t.ttft_s * 1e3 for r, t in pairs]
    return Calibration(
        concurrency=concurrency,
        workers=workers,
        requests=len(pairs),
        recorded_once=recorded_once,
        ttft_p50_ms=p([r.ttft_ms or 0.0 for r, _ in pairs], 50),
        ttft_true_p50_ms=p([t.ttft_s * 1e3 for _, t in pairs], 50),
        ttft_error_ms=p(ttft_error, 50),
        ttft_error_p99_ms=p(ttft_error, 99),
        itl_p50_ms=p([g for r, _ in pairs for g in r.itl_ms], 50),
        itl_true_p50_ms=p([g * 1e3 for _, t in pairs for g in t.itl_s], 50),
        tokens_exact=sum(r.output_tokens == t.completion_tokens for r, t in pairs) / len(pairs),
        uplink_p50_ms=p(uplink, 50),
        uplink_p99_ms=p(uplink, 99),
        downlink_p50_ms=p(downlink, 50),
        downlink_p99_ms=p(downlink, 99),
        loop_lag_p99_ms=max(r.loop_lag_ms_p99 or 0.0 for r in result.runs),
    )


def render(rows: Sequence[Calibration]) -> Table:
    t = Table(title="harness error against the reference server's truth log (p50 unless noted)")
    cols = ["users", "workers", "n", "once", "TTFT ms", "true", "error p50/p99", "ITL ms",
            "true", "error", "tokens exact", "uplink p50/p99", "downlink p50/p99",
            "loop lag p99"]  # fmt: skip
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(
            str(r.concurrency), str(r.workers), str(r.requests), "yes" if r.recorded_once else "NO",
            f"{r.ttft_p50_ms:.2f}", f"{r.ttft_true_p50_ms:.2f}",
            f"{r.ttft_error_ms:+.2f} / {r.ttft_error_p99_ms:+.2f}",
            f"{r.itl_p50_ms:.3f}", f"{r.itl_true_p50_ms:.3f}", f"{r.itl_error_ms:+.3f}",
            f"{r.tokens_exact:.0%}",
            f"{r.uplink_p50_ms:.2f} / {r.uplink_p99_ms:.2f}",
            f"{r.downlink_p50_ms:.2f} / {r.downlink_p99_ms:.2f}",
            f"{r.loop_lag_p99_ms:.2f}",
        )  # fmt: skip
    return t


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench.calibrate",
        description=(
            "Measure the harness's own timing error on this machine: run it against the "
            "reference server (TTFT and ITL known exactly) and compare with the server's log."
        ),
    )
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--rounds", type=int, default=4, help="requests per user at each level")
    ap.add_argument("--ttft-ms", type=float, default=50.0)
    ap.add_argument("--itl-ms", type=float, default=10.0)
    ap.add_argument("--tokens-per-event", type=int, default=1)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument(
        "--range-ratio",
        type=float,
        default=0.0,
        help="output lengths vary by this fraction; 0 keeps every user in lockstep (worst case)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1],
        help="client worker processes (client.workers); each level runs at each count",
    )
    ap.add_argument("--backend", choices=("local", "ray"), default="local")
    args = ap.parse_args(argv)
    rows = [
        measure(
            c,
            c * args.rounds,
            args.ttft_ms,
            args.itl_ms,
            args.tokens_per_event,
            args.output_tokens,
            args.range_ratio,
            workers=w,
            backend=args.backend,
        )
        for c in args.concurrency
        for w in args.workers
    ]
    Console(width=180).print(render(rows))


if __name__ == "__main__":
    main()
