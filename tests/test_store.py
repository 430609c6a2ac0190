from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench import store
from bench.records import (
    REQUESTS_SCHEMA,
    RUNS_SCHEMA,
    SCHEMA_VERSION,
    TELEMETRY_SCHEMA,
    RequestRecord,
    TelemetryRecord,
)
from tests.synthetic import request_record, run_record

DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def test_every_column_is_documented_in_metrics_md() -> None:
    documented = set(re.findall(r"[a-z_0-9]+", DOCS.read_text()))
    for schema in (REQUESTS_SCHEMA, RUNS_SCHEMA, TELEMETRY_SCHEMA):
        missing = set(schema.names) - documented
        assert not missing, f"columns missing from docs/metrics.md: {sorted(missing)}"


def test_schemas_follow_the_records() -> None:
    assert REQUESTS_SCHEMA.names == [f.name for f in dataclasses.fields(RequestRecord)]
    assert REQUESTS_SCHEMA.field("itl_ms").type == pa.list_(pa.float64())
    assert REQUESTS_SCHEMA.field("ok").type == pa.bool_()


def test_flush_writes_readable_files_and_leaves_no_temporaries(tmp_path: Path) -> None:
    s = store.RunStore(tmp_path, "run-1")
    s.telemetry.append(TelemetryRecord(SCHEMA_VERSION, "run-1", 0.5, "client", "loop_lag_ms", 0.1))
    s.flush()
    s.flush()  # rewriting is idempotent
    data = store.load(tmp_path / "run-1")
    assert data.telemetry["value"].tolist() == [0.1]
    assert data.requests.empty and list(data.requests.columns) == REQUESTS_SCHEMA.names
    assert not list((tmp_path / "run-1").glob("*.tmp"))


def test_files_of_another_schema_version_are_refused(tmp_path: Path) -> None:
    s = store.RunStore(tmp_path, "old")
    s.flush()
    path = tmp_path / "old" / "runs.parquet"
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata({b"bench.schema_version": b"0"}), path)
    with pytest.raises(ValueError, match="schema version 0"):
        store.load(tmp_path / "old")


def test_runs_of_schema_4_load_with_null_reasoning_and_group_columns(tmp_path: Path) -> None:
    s = store.RunStore(tmp_path, "v4")
    s.requests, s.runs = [request_record(run_id="v4")], [run_record(run_id="v4")]
    s.flush()
    added = {
        "requests": ["group_id", "group_position", "reasoning_tokens", "ttfo_ms"],
        "runs": ["ttfo_ms_p50", "ttfo_ms_p99"],
    }
    for name in ("requests", "runs", "telemetry"):
        path = s.dir / f"{name}.parquet"
        table = pq.read_table(path).drop(added.get(name, []))
        pq.write_table(table.replace_schema_metadata({b"bench.schema_version": b"4"}), path)
    data = store.load(s.dir)
    assert set(data.requests.columns) == set(REQUESTS_SCHEMA.names)
    assert set(data.runs.columns) == set(RUNS_SCHEMA.names)
    assert data.requests[added["requests"]].isna().all().all()
    assert data.runs[added["runs"]].isna().all().all()
    assert data.requests["ttft_ms"].tolist() == [10.0]


def test_a_crash_while_writing_leaves_the_last_complete_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = store.RunStore(tmp_path, "run-1")
    s.requests.append(request_record(index=0))
    s.flush()
    real_write = pq.write_table

    def dies_halfway(table: pa.Table, where: object, **kwargs: object) -> None:
        real_write(table, where, **kwargs)  # type: ignore[arg-type]
        assert hasattr(where, "truncate")
        where.truncate(100)  # type: ignore[attr-defined]  # what a killed process leaves
        raise KeyboardInterrupt

    s.requests.append(request_record(index=1))
    monkeypatch.setattr(pq, "write_table", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        s.flush()
    monkeypatch.undo()
    # The half-written file is a temporary nothing reads; the file is the last complete one.
    assert (tmp_path / "run-1" / "requests.parquet.tmp").stat().st_size == 100
    assert store.load(tmp_path / "run-1").requests["index"].tolist() == [0]
    assert store.find_run_dirs([tmp_path]) == [tmp_path / "run-1"]
    s.flush()  # the next flush replaces both
    assert store.load(tmp_path / "run-1").requests["index"].tolist() == [0, 1]


def test_an_unwritable_results_dir_is_refused_before_anything_runs(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(store.ResultsDirError, match="cannot be written"):
        store.check_results_dir(blocker / "runs", requests=10, output_tokens=128)
    store.check_results_dir(tmp_path / "runs", requests=10, output_tokens=128)
    assert (tmp_path / "runs").is_dir() and not any((tmp_path / "runs").iterdir())


def test_a_results_dir_without_room_for_the_run_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = store.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(store.shutil, "disk_usage", lambda _: usage._replace(free=100 * 2**20))
    store.check_results_dir(tmp_path, requests=1_000, output_tokens=128)  # about 8 MiB
    with pytest.raises(store.ResultsDirError, match="100 MiB free; this run needs about 9,766 MiB"):
        store.check_results_dir(tmp_path, requests=200_000, output_tokens=1024)
