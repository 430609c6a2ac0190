"""How often A/A comparisons call a change: consecutive sessions of one build compared pairwise.

Record several sessions of one build (the same `python -m bench` command, one invocation each,
each into its own results_dir under ROOT), then:

    .venv/bin/python benchmarks/aa_verdicts.py ROOT

Each session is compared with the next as bench.compare compares a stored baseline (the
session test, one session a side), and, for contrast, with the per-run Welch test that
interleaved builds use (which treats every repeat as independent). Every verdict is false:
both sides ran the same build.
"""

import itertools
import sys
from pathlib import Path

from bench import compare, store


def main() -> None:
    root = Path(sys.argv[1])
    sessions = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for mode, name in ((compare.STORED, "session test"), (compare.INTERLEAVED, "per-run test")):
        flagged = 0
        for a, b in itertools.pairwise(sessions):
            base = compare.load_side("baseline", str(a), store.find_run_dirs([a]))
            cand = compare.load_side("candidate", str(b), store.find_run_dirs([b]))
            counts = compare.compare(base, cand, mode).counts()
            flagged += bool(counts["better"] or counts["worse"])
            print(
                f"{name}: {a.name} -> {b.name}: {counts['better']} better, "
                f"{counts['worse']} worse, {counts['~']} unchanged"
            )
        print(f"{name}: {flagged} of {len(sessions) - 1} A/A reports with a verdict\n")


if __name__ == "__main__":
    main()
