"""Resuming an interrupted run: `python -m bench resume=RUN_DIR`.

The run's own recorded configuration is run again (`recorded_config`), into the same directory
under the same run id. Every (repeat, level) whose row is complete is kept as it is and not run
again; a level repeat that stopped early is measured again whole, its earlier rows dropped, so
no request is recorded twice and every level repeat is one uninterrupted measurement. The
workload is a pure function of the configuration and its seed, so the levels still to run get
exactly the requests they would have had. The new rows' times continue after the kept ones on
the run's time axis.

A capacity search is not resumed: each probe's load depends on every round before it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

from bench import store
from bench.config import BenchConfig, ConfigError
from bench.records import REQUESTS_SCHEMA, RUNS_SCHEMA, SCHEMA_VERSION, TELEMETRY_SCHEMA


@dataclass(frozen=True)
class Resumed:
    run_dir: Path
    run_id: str
    done: frozenset[tuple[int, int]]  # (repeat, level) measured complete before
    kept: dict[str, pa.Table]  # per file (requests, runs, telemetry), the rows kept
    after_s: float  # past every kept row's times, on the run's time axis


def config_hash(cfg: BenchConfig) -> str:
    return hashlib.sha256(cfg.resolved_yaml.encode()).hexdigest()[:16]


def recorded_config(run_dir: Path, overrides: Sequence[str]) -> DictConfig:
    """The configuration `run_dir` was measured with, with the command line's other key=value
    settings on top (a masked target.api_key must be given again)."""
    try:  # only what says how it was measured: `load` reads the whole run afterwards
        runs = pd.read_parquet(run_dir / "runs.parquet", columns=["config_yaml"])
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise ConfigError(
            f"resume={run_dir}: not a run directory that can be read ({exc})"
        ) from None
    if runs.empty:
        raise ConfigError(f"resume={run_dir}: the run has no rows to resume from")
    others = [o for o in overrides if not o.startswith("resume=")]
    if groups := [o for o in others if o.split("=")[0] in ("scenario", "target")]:
        raise ConfigError(
            f"resume={run_dir}: {groups[0]} would change what the run measures; a resumed run "
            "keeps its own scenario and target"
        )
    recorded = OmegaConf.create(str(runs["config_yaml"].iloc[0]))
    merged = OmegaConf.merge(recorded, OmegaConf.from_dotlist(others))
    merged.resume = str(run_dir)
    assert isinstance(merged, DictConfig)
    return merged


def load(cfg: BenchConfig) -> Resumed:
    """What the run at cfg.resume already holds; raises ConfigError where it cannot go on."""
    assert cfg.resume is not None
    run_dir = Path(cfg.resume)
    key = f"resume={run_dir}"
    if cfg.scenario.search:
        raise ConfigError(f"{key}: a capacity search cannot be resumed; run it again")
    data = store.load(run_dir)
    runs = data.runs
    versions = set(runs["schema_version"])
    if versions != {SCHEMA_VERSION}:
        raise ConfigError(
            f"{key}: written under schema version {sorted(versions)}, this harness writes "
            f"{SCHEMA_VERSION}; run it again instead"
        )
    if set(runs["config_hash"]) != {config_hash(cfg)}:
        raise ConfigError(
            f"{key}: the run was measured with another configuration; resume it with its own "
            "(python -m bench resume=DIR, nothing else but a masked target.api_key)"
        )
    complete = runs[runs["status"] == "complete"]
    done = frozenset(
        zip(complete["repeat"].astype(int), complete["level"].astype(int), strict=True)
    )

    def kept(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[[pair in done for pair in _pairs(frame)]]

    requests, runs_kept = kept(data.requests), kept(runs)
    times = [*requests["end_s"].dropna(), *data.telemetry["t_s"].dropna()]
    return Resumed(
        run_dir=run_dir,
        run_id=str(runs["run_id"].iloc[0]),
        done=done,
        kept={
            "requests": _table(requests, REQUESTS_SCHEMA),
            "runs": _table(runs_kept, RUNS_SCHEMA),
            "telemetry": _table(data.telemetry, TELEMETRY_SCHEMA),
        },
        after_s=max(times, default=0.0) + 1.0,
    )


def _pairs(frame: pd.DataFrame) -> list[tuple[int, int]]:
    return list(zip(frame["repeat"].astype(int), frame["level"].astype(int), strict=True))


def _table(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
