"""Parquet files of one run under DIR/<run_id>/: requests, runs and telemetry.

The store rewrites each file whole after every load level, through a temporary file that is
flushed to disk before an atomic rename: at any moment every file on disk is complete and
readable, so a crash of the server, of the harness or of the machine loses nothing that had
finished, and a half-written file is only ever a `*.parquet.tmp` that nothing reads.
`check_results_dir` finds an unwritable or full results directory before a run sends anything.

Reading back: `find_run_dirs` finds the run directories under the paths a user gives, `load`
reads one run and `load_all` several as one build.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import OmegaConf

from bench.records import (
    REQUESTS_SCHEMA,
    RUNS_SCHEMA,
    SCHEMA_VERSION,
    TELEMETRY_SCHEMA,
    RequestRecord,
    RunRecord,
    TelemetryRecord,
    to_table,
)

_METADATA = {b"bench.schema_version": str(SCHEMA_VERSION).encode()}
# Older versions this harness still reads, with the columns each lacks per file: they read
# back as nulls. Version 4 added the speed probes to runs.parquet; version 5 reasoning (TTFO,
# reasoning tokens), request groups and the ramp-up mark (null reads as not ramp-up); version
# 6 the client's workers.
_ADDED_IN_6 = {
    "requests": ("worker",),
    "runs": (
        "workers",
        "worker_loop_lag_ms_p99",
        "worker_send_lag_ms_p99",
        "worker_clock_offset_ms",
        "worker_clock_uncertainty_ms",
    ),
}
_ADDED_IN_5 = {
    "requests": ("group_id", "group_position", "ramp_up", "reasoning_tokens", "ttfo_ms"),
    "runs": ("ttfo_ms_p50", "ttfo_ms_p99"),
}


def _and(*versions: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    return {f: tuple(c for v in versions for c in v.get(f, ())) for f in ("requests", "runs")}


_MISSING_COLUMNS: dict[int, dict[str, tuple[str, ...]]] = {
    3: _and({"runs": ("probe_before_json", "probe_after_json")}, _ADDED_IN_5, _ADDED_IN_6),
    4: _and(_ADDED_IN_5, _ADDED_IN_6),
    5: _ADDED_IN_6,
}


class ResultsDirError(RuntimeError):
    """The results directory cannot take the run's files."""


# A request's row: its fixed columns, then 3 lists of 8-byte values per output token (ITL,
# event times, tokens per event), before compression; the file is rewritten beside its old self.
_ROW_BYTES, _TOKEN_BYTES, _MIN_FREE = 1024, 24, 64 * 2**20


def check_results_dir(results_dir: str | Path, requests: int, output_tokens: int) -> None:
    """Raise ResultsDirError if `results_dir` cannot be written, or has less free space than
    `requests` rows of `output_tokens` need (twice: a file is rewritten beside its old self),
    and at least 64 MiB. Creates the directory, as the run would."""
    path = Path(results_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-check-{os.getpid()}"
        with probe.open("wb") as f:
            f.write(b"\0" * 4096)
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        raise ResultsDirError(
            f"results_dir {path} cannot be written ({exc.strerror or exc}): nothing was sent; "
            "pick another with results_dir=DIR"
        ) from None
    needed = max(_MIN_FREE, 2 * requests * (_ROW_BYTES + _TOKEN_BYTES * output_tokens))
    free = shutil.disk_usage(path).free
    if free < needed:
        raise ResultsDirError(
            f"results_dir {path} has {free / 2**20:,.0f} MiB free; this run needs about "
            f"{needed / 2**20:,.0f} MiB for its files: nothing was sent; free some space or "
            "pick another with results_dir=DIR"
        )


def _write_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(".parquet.tmp")
    with tmp.open("wb") as f:
        pq.write_table(table.replace_schema_metadata(_METADATA), f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it the file
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # and the rename itself
    finally:
        os.close(directory)


class RunStore:
    """The run's rows: this session's, after any `kept` from an earlier one (a resumed run)."""

    def __init__(
        self, results_dir: str | Path, run_id: str, kept: dict[str, pa.Table] | None = None
    ) -> None:
        self.dir = Path(results_dir) / run_id
        self.kept = kept or {}
        self.requests: list[RequestRecord] = []
        self.runs: list[RunRecord] = []
        self.telemetry: list[TelemetryRecord] = []

    def flush(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, rows, schema in (
            ("requests", self.requests, REQUESTS_SCHEMA),
            ("runs", self.runs, RUNS_SCHEMA),
            ("telemetry", self.telemetry, TELEMETRY_SCHEMA),
        ):
            table = to_table(rows, schema)
            if name in self.kept:
                table = pa.concat_tables([self.kept[name], table])
            _write_atomic(table, self.dir / f"{name}.parquet")


@dataclass(frozen=True)
class StoredRun:
    requests: pd.DataFrame
    runs: pd.DataFrame
    telemetry: pd.DataFrame


def load(run_dir: str | Path) -> StoredRun:
    """Read a run back, a column that an older readable version lacks as nulls; refuses files
    written under any other schema version."""
    run_dir = Path(run_dir)
    frames: dict[str, Any] = {}
    readable = [*_MISSING_COLUMNS, SCHEMA_VERSION]
    for name in ("requests", "runs", "telemetry"):
        path = run_dir / f"{name}.parquet"
        meta = pq.read_schema(path).metadata or {}
        version = meta.get(b"bench.schema_version", b"?").decode()
        if version not in map(str, readable):
            raise ValueError(
                f"{path} has schema version {version}; this harness reads versions "
                f"{', '.join(map(str, readable))} (docs/metrics.md lists the changes)"
            )
        frame = pd.read_parquet(path)
        for column in _MISSING_COLUMNS.get(int(version), {}).get(name, ()):
            frame[column] = None
        frames[name] = frame
    return StoredRun(**frames)


def find_run_dirs(paths: Sequence[Path]) -> list[Path]:
    """The run directories (those holding runs.parquet) that `paths` name: each path is one,
    or a folder with run directories somewhere below it (what a multirun, an A/B round or a
    baseline leaves); hidden folders below it are skipped. Raises FileNotFoundError naming
    the path that is missing or holds no run."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"run directory {path} does not exist")
        if (path / "runs.parquet").is_file():
            found.append(path)
            continue
        inside = sorted(
            p.parent
            for p in path.rglob("runs.parquet")
            if not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not inside:
            raise FileNotFoundError(
                f"{path} has no runs.parquet, nor has any directory below it: pass a run "
                "directory written by `python -m bench` (results_dir/<run_id>/) or a folder of them"
            )
        found += inside
    return found


Args = TypeVar("Args")


def run_arguments(argv: Sequence[str], schema: type[Args]) -> Args:
    """The key=value arguments of a command that reads runs (bench.report, bench.diagnose) as
    `schema`, a dataclass with a `run: list[str]` field: run= may repeat, which a dotlist
    alone would collapse to the last. Raises OmegaConf's errors for a bad key or value."""
    runs = [a.removeprefix("run=") for a in argv if a.startswith("run=")]
    rest = [a for a in argv if not a.startswith("run=")]
    merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(rest))
    args = OmegaConf.to_object(merged)
    assert isinstance(args, schema)
    args.run = runs  # type: ignore[attr-defined]
    return args


def load_all(run_dirs: Sequence[Path]) -> StoredRun:
    """Several runs read back as one build: their rows concatenated."""
    loaded = [load(d) for d in run_dirs]
    return StoredRun(
        requests=pd.concat([x.requests for x in loaded], ignore_index=True),
        runs=pd.concat([x.runs for x in loaded], ignore_index=True),
        telemetry=pd.concat([x.telemetry for x in loaded], ignore_index=True),
    )
