"""`python -m bench.diagnose run=DIR`: a run's findings (bench/diagnosis.py) printed, and
written beside its Parquet files as diagnosis.json, with its telemetry timeline as timeline.png.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException

from bench import store
from bench.diagnosis import DIAGNOSIS_FILE, TIMELINE_FILE, Diagnosis, Thresholds, diagnose
from bench.figures import timeline

# ---- output ------------------------------------------------------------------------------


def evidence_text(evidence: dict[str, float]) -> str:
    """The figures as the JSON file names them: "ceiling 2 · waiting_share 0.92 · ..."."""
    return " · ".join(
        f"{k} {v:,.0f}" if abs(v) >= 1000 else f"{k} {v:.4g}" for k, v in evidence.items()
    )


def windows_text(windows: Sequence[Sequence[float]]) -> str:
    return ", ".join(f"{a:.2f}–{b:.2f} s" for a, b in windows)


def not_evaluated_lines(diagnosis: Diagnosis) -> list[str]:
    """One line per rule and reason, naming the levels (or "every level") it applies to."""
    by_reason: dict[tuple[str, str], list[str]] = {}
    for s in diagnosis.not_evaluated:
        by_reason.setdefault((s.rule, s.reason), []).append(s.level)
    out = []
    for (rule, reason), levels in by_reason.items():
        where = "every level" if len(levels) == len(diagnosis.evaluated) else ", ".join(levels)
        out.append(f"{rule} ({where}): {reason}")
    return out


def render(diagnosis: Diagnosis) -> str:
    """The findings as the command line prints them."""
    lines = []
    for f in diagnosis.findings:
        lines += [
            f"[{f.rule}] {f.title}",
            f"  level     {f.level}",
            f"  windows   {windows_text(f.windows)}",
            f"  detail    {f.detail}",
            f"  evidence  {evidence_text(f.evidence)}",
            *(f"  {'knobs' if i == 0 else '':<9} {k}" for i, k in enumerate(f.knobs)),
            "",
        ]
    if not diagnosis.findings:
        rules = ", ".join(diagnosis.rules_evaluated()) or "none"
        lines += [f"no findings (rules evaluated: {rules})", ""]
    skipped = not_evaluated_lines(diagnosis)
    if skipped:
        lines += ["not evaluated:", *(f"  {line}" for line in skipped)]
    return "\n".join(lines).rstrip() + "\n"


def _save(diagnosis: Diagnosis, run_dir: Path) -> Path:
    path = run_dir / DIAGNOSIS_FILE
    path.write_text(json.dumps(diagnosis.to_json(), indent=2) + "\n", encoding="utf-8")
    return path


def write_diagnosis(run_dir: str | Path, thresholds: Thresholds | None = None) -> Path:
    """DIR/diagnosis.json: the findings with their evidence, the thresholds used and the rules
    not evaluated."""
    run_dir = Path(run_dir)
    return _save(diagnose(store.load(run_dir), thresholds or Thresholds()), run_dir)


def read_diagnosis(path: str | Path) -> Diagnosis:
    return Diagnosis.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


# ---- command line ------------------------------------------------------------------------


@dataclass
class DiagnoseArgs:
    run: list[str] = field(default_factory=list)


USAGE = """\
python -m bench.diagnose: findings from a run's measurements, and the knobs to turn.

Usage:
  python -m bench.diagnose run=PATH

Keys:
  run=PATH   a run directory (results_dir/<run_id>/, with runs.parquet), or a folder of them;
             each gets its findings printed, and diagnosis.json and timeline.png written into it

Rules (docs/metrics.md, "Diagnosis"): under_fed, batch_cap, kv_pressure, queue_dominated_ttft,
client_bound, tp_imbalance, bursty_delivery.

Example:
  python -m bench.diagnose run=results/runs/20261122-215613-concurrency-b8a18a
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(argv):
        print(USAGE, end="")
        return 0
    try:
        args = store.run_arguments(argv, DiagnoseArgs)
        if not args.run:
            raise ValueError("no run given: pass run=PATH (see --help)")
        dirs = store.find_run_dirs([Path(p) for p in args.run])
        loaded = [(d, store.load(d)) for d in dirs]
    except OmegaConfBaseException as exc:
        first = str(exc).splitlines()[0]
        print(f"error: {first}; the only key is run", file=sys.stderr)
        return 2
    # store.find_run_dirs finding no runs; store.load refusing another schema version
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for run_dir, stored in loaded:
        diagnosis = diagnose(stored)
        path = _save(diagnosis, run_dir)
        figure = timeline(stored, run_dir / TIMELINE_FILE)
        print(f"diagnosis of {run_dir}\n")
        print(render(diagnosis))
        print(f"written: {path}\n         {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
