"""Named baselines: runs kept under `results/baselines/NAME/` to compare later builds against.

A baseline holds **sessions**: a session is one invocation of `python -m bench` for one
scenario (all its levels and repeats, measured on one machine state), stored as that run's own
Parquet directory, named by its run_id, which is the session's id. Saving a scenario again adds
a session; the newest `baseline.keep` sessions per scenario are kept and older ones deleted.
Repeats within a session share the machine's state of those minutes, so they say nothing of how
far the machine moves between sessions; several sessions do, and `bench.compare` tests a
candidate session against the spread of the baseline's (docs/metrics.md). A baseline saved when
it kept one run per scenario is the same layout with one session each.

`manifest.json` lists every session (`runs`, oldest first within a scenario) with what it
measured: model, engine settings, workload hash, machine (`hardware_key` in one line, and in
`environment` the whole fingerprint with its `machine`), git commit and date. A few megabytes
per session of the standard scenarios (mostly per-token gaps). A baseline is only comparable on
the machine it was measured on (`bench.compare` refuses another), so it stays there: `results/`
is git-ignored (keep a CI runner's baselines in a directory of its own, `baseline.dir=...`, as
docs/ci-example.yml does).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from bench import store
from bench.environment import Machine

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Entry:
    run_id: str
    scenario: str
    model: str
    target_kind: str
    engine: str  # the engine knobs set on the command line, e.g. "max_num_seqs=64", or ""
    workload_hash: str
    hardware_key: str
    git_commit: str | None
    git_dirty: bool | None
    started_at: str
    environment: dict[str, Any]  # the run's whole fingerprint: packages, Python, its machine
    # What the engine computed with, e.g. "attention=cpu-kernel ...", or "" (also for
    # manifests written before schema 3, which did not record it).
    kernels: str = ""

    @property
    def machine(self) -> Machine | None:
        """The machine the run was measured on; None for a run recorded without its identity."""
        return Machine.of(self.environment)


def engine_knobs(config_yaml: str) -> str:
    """The bundled engine's knobs that a run set (non-null `runtime.*`), as `k=v` pairs."""
    runtime = OmegaConf.to_container(OmegaConf.create(config_yaml)).get("runtime") or {}  # type: ignore[union-attr]
    # log_level changes what the engine prints, not how it serves.
    knobs = sorted((k, v) for k, v in runtime.items() if v is not None and k != "log_level")
    return " ".join(f"{k}={v}" for k, v in knobs)


def kernels_of(kernels_json: object) -> str:
    """A run's engine_kernels_json as `k=v` pairs; "" where the server did not report them."""
    if not isinstance(kernels_json, str):  # null: None or NaN, as pandas reads it
        return ""
    return " ".join(f"{k}={v}" for k, v in json.loads(str(kernels_json)).items())


def entry_of(runs: pd.DataFrame, where: Path) -> Entry:
    """What one run (its runs.parquet rows, read from `where`) measured, for a manifest."""
    if runs.empty:
        raise ValueError(f"{where} holds no finished load level")
    first = runs.iloc[0]
    return Entry(
        run_id=str(first["run_id"]),
        scenario=str(first["scenario"]),
        model=str(first["model"]),
        target_kind=str(first["target_kind"]),
        engine=engine_knobs(str(first["config_yaml"])),
        kernels=kernels_of(first["engine_kernels_json"]),
        workload_hash=str(first["workload_hash"]),
        hardware_key=str(first["hardware_key"]),
        git_commit=None if pd.isna(first["git_commit"]) else str(first["git_commit"]),
        git_dirty=None if pd.isna(first["git_dirty"]) else bool(first["git_dirty"]),
        started_at=str(runs["started_at"].min()),
        environment=json.loads(str(first["environment_json"])),
    )


def save(run_dir: Path, name: str, root: Path, keep: int) -> Path:
    """Add a finished run to baseline `name` as a new session of its scenario, keeping that
    scenario's newest `keep` sessions (older ones are deleted); returns the baseline's
    directory. Saving a run that is already there replaces it."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"baseline.save: expected a plain name like 'main', got {name!r}")
    if keep < 1:
        raise ValueError(f"baseline.keep: expected an integer >= 1, got {keep!r}")
    entry = entry_of(pd.read_parquet(run_dir / "runs.parquet"), run_dir)
    home = root / name
    home.mkdir(parents=True, exist_ok=True)
    manifest = [e for e in _read(home) if e.run_id != entry.run_id]
    shutil.rmtree(home / entry.run_id, ignore_errors=True)
    # Parquet only: Hydra's bookkeeping and temporary files are no part of a baseline.
    shutil.copytree(run_dir, home / entry.run_id, ignore=shutil.ignore_patterns("*.tmp", ".*"))
    manifest.append(entry)
    same = [e for e in manifest if e.scenario == entry.scenario]
    for old in same[: max(0, len(same) - keep)]:  # oldest first: the order they were saved in
        shutil.rmtree(home / old.run_id, ignore_errors=True)
        manifest.remove(old)
    document = {
        "name": name,
        "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        # Stable by scenario, so each scenario's sessions stay in the order they were saved.
        "runs": [asdict(e) for e in sorted(manifest, key=lambda e: e.scenario)],
    }
    (home / MANIFEST).write_text(json.dumps(document, indent=2) + "\n")
    return home


def sessions(home: Path) -> dict[str, list[Entry]]:
    """A baseline's sessions per scenario, oldest first; each entry's run_id is the session id
    and names its run directory under `home`."""
    out: dict[str, list[Entry]] = {}
    for entry in _read(home):
        out.setdefault(entry.scenario, []).append(entry)
    return out


def _read(home: Path) -> list[Entry]:
    path = home / MANIFEST
    if not path.is_file():
        return []
    return [Entry(**e) for e in json.loads(path.read_text())["runs"]]


def run_dirs(source: str, root: Path) -> list[Path]:
    """The run directories `source` names: a baseline name under `root`, a baseline or run
    directory, or a directory of run directories (what a multirun or an A/B round leaves).
    Each is one session; its runs carry the session id as their run_id."""
    path = Path(source)
    if not path.exists() and (root / source).is_dir():
        path = root / source
    if not path.is_dir():
        known = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise FileNotFoundError(
            f"{source!r} is neither a baseline in {root} ({', '.join(known) or 'none saved yet'})"
            " nor a directory of runs; save one with `python -m bench ... baseline.save=NAME`"
        )
    return store.find_run_dirs([path])
