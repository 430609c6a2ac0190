"""The README's Python examples run as written, against results laid out as a run leaves them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.store import RunStore
from tests.synthetic import run_record

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_pandas_example_reads_the_latest_runs_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (example,) = [b for b in _python_blocks() if "read_parquet" in b]
    for run_id, concurrency in (
        ("20261201-183726-concurrency-8a266d", 1),
        ("20261205-105231-concurrency-5df53a", 8),
    ):
        store = RunStore(tmp_path / "results" / "runs", run_id)
        store.runs.append(
            run_record(run_id=run_id, scenario="concurrency", concurrency=concurrency)
        )
        store.flush()
    monkeypatch.chdir(tmp_path)
    *statements, last = example.strip().splitlines()
    scope: dict[str, object] = {}
    exec("\n".join(statements), scope)
    table = eval(last, scope)
    assert list(table.index) == [8]  # the latest run's level, not the older one's
    assert list(table.columns) == ["ttft_ms_p50", "output_throughput", "success_rate"]
