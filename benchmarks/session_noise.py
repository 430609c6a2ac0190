"""Between-session noise of a machine: how far A/A sessions of one build move apart.

A session is one invocation of `python -m bench`: all its levels and repeats, on one machine
state. Record several sessions of one build (the same command, one after another), then:

    .venv/bin/python benchmarks/session_noise.py /tmp/aa

Per metric and level, each session's mean of the log per-run values; "sd of session means" is
their standard deviation, "within se" the root mean of each session's variance of the mean
(variance / repeats), and "between sd" sqrt(sd^2 - within se^2): the session effect with the
repeats' own noise taken out (0 where that is negative). The last table gives, per family of
bench.stats.SESSION_SD_DEFAULTS, the median between-session sd over its metrics and levels:
the default that a one-session comparison on this machine would need.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench import store
from bench.compare import LOAD_TIME, METRICS
from bench.levels import levels_of
from bench.stats import SESSION_SD_DEFAULTS, session_sd_family


def _pct(sd_of_log: float) -> str:
    return f"{sd_of_log * 100:.1f}%"


def _spread(sessions: list[np.ndarray]) -> tuple[float, float, float]:
    """(sd of session means, within-session se, between-session sd), all of log values."""
    means = np.array([s.mean() for s in sessions])
    sd = float(means.std(ddof=1))
    within = [s.var(ddof=1) / len(s) for s in sessions if len(s) > 1]
    within_se = float(np.sqrt(np.mean(within))) if within else 0.0
    return sd, within_se, float(np.sqrt(max(sd**2 - within_se**2, 0.0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run directories, or folders of them")
    args = parser.parse_args()
    sessions = [store.load(d).runs for d in store.find_run_dirs(args.runs)]
    if len(sessions) < 3:
        raise SystemExit(f"found {len(sessions)} sessions; record at least 3")
    table = Table(title=f"between-session noise over {len(sessions)} sessions (sd of log values)")
    for name in ("metric", "level", "sd of session means", "within se", "between sd"):
        table.add_column(name, justify="left" if name in ("metric", "level") else "right")
    families: dict[str, list[float]] = {}
    for metric in METRICS:
        by_level: dict[str, list[np.ndarray]] = {}
        for runs in sessions:
            for level, frame in levels_of(runs).items():
                values = frame[metric.column].astype(float).dropna()
                if len(values):
                    by_level.setdefault(level.label, []).append(np.log(values.to_numpy()))
        for label, logs in by_level.items():
            if len(logs) < 3:
                continue
            sd, within_se, between = _spread(logs)
            families.setdefault(session_sd_family(metric.column), []).append(between)
            table.add_row(metric.label, label, _pct(sd), _pct(within_se), _pct(between))
    starts = [r[LOAD_TIME.column].astype(float).dropna() for r in sessions]
    if all(len(s) for s in starts):  # one server start per session
        load_sd = float(np.log([s.iloc[0] for s in starts]).std(ddof=1))
        families.setdefault("load time", []).append(load_sd)
        table.add_row(LOAD_TIME.label, "per start", _pct(load_sd), "-", _pct(load_sd))
    console = Console()
    console.print(table)
    defaults = Table(title="median between-session sd per family, and the default in use")
    for name in ("family", "measured", "default (bench.stats)"):
        defaults.add_column(name, justify="left" if name == "family" else "right")
    for family, default in SESSION_SD_DEFAULTS.items():
        measured = families.get(family)
        shown = _pct(statistics.median(measured)) if measured else "-"
        defaults.add_row(family, shown, _pct(default))
    console.print(defaults)


if __name__ == "__main__":
    main()
