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
