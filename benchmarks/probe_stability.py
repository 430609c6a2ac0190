"""The machine speed probe's cost and stability: each figure's spread over repeated probes.

Runs the probe (bench/probe.py) `--runs` times and prints, per figure, the median, min, max
and coefficient of variation, and the probe's wall time. With `--load N` every other probe
runs while N busy-looping processes hold N cores, and the table splits the probes into quiet
and loaded: a figure that does not move under load cannot see a busier machine.

    python benchmarks/probe_stability.py [--runs 20] [--load 1]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from bench import probe


def _spin(stop: mp.synchronize.Event) -> None:
    while not stop.is_set():
        pass


def _probe_under_load(cores: int) -> probe.Probe:
    stop = mp.Event()
    workers = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(cores)]
    for w in workers:
        w.start()
    time.sleep(0.2)  # the spinners running before the probe starts
    try:
        return probe.measure()
    finally:
        stop.set()
        for w in workers:
            w.join()


def _rows(name: str, probes: Sequence[probe.Probe]) -> list[list[str]]:
    rows = []
    columns = [(f.label, f.unit, [p.value(f) for p in probes]) for f in probe.FIGURES]
    columns.append(("probe wall time", "s", [p.wall_s for p in probes]))
    for label, unit, values in columns:
        xs = [v for v in values if v is not None]
        if not xs:
            continue
        cv = statistics.stdev(xs) / statistics.mean(xs) if len(xs) > 1 else 0.0
        cells = [f"{statistics.median(xs):.3g}", f"{min(xs):.3g}", f"{max(xs):.3g}"]
        rows.append([name, f"{label} {unit}", *cells, f"{cv:.1%}", str(len(xs))])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--load", type=int, default=0, help="busy cores during every other probe")
    args = ap.parse_args()
    quiet: list[probe.Probe] = []
    loaded: list[probe.Probe] = []
    for i in range(args.runs):
        if args.load and i % 2:
            loaded.append(_probe_under_load(args.load))
        else:
            quiet.append(probe.measure())
    table = Table(title=f"speed probe: {args.runs} probes" + (f", {args.load} busy core(s) "
                  "in every other" if args.load else ""))  # fmt: skip
    for column in ("probes", "figure", "median", "min", "max", "CV", "n"):
        table.add_column(column, justify="left" if column in ("probes", "figure") else "right")
    for row in _rows("quiet" if args.load else "all", quiet) + _rows("loaded", loaded):
        table.add_row(*row)
    Console(width=100).print(table)


if __name__ == "__main__":
    main()
