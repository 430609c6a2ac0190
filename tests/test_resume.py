"""`python -m bench resume=RUN_DIR`: an interrupted run goes on where it stopped, in its own
files, with no request recorded twice and none lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import store

pytestmark = pytest.mark.slow

SCENARIO = (
    "target=refserver", "scenario.concurrency=[1,2]", "scenario.repeats=3",
    "scenario.num_requests=6", "scenario.output_tokens=40", "scenario.warmup_requests=1",
    "target.server_args.itl-ms=5", "progress=false",
)  # fmt: skip


def _bench(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _interrupted_run(results: Path) -> Path:
    """A run stopped by SIGINT in its third level repeat or later."""
    proc = _bench(*SCENARIO, f"results_dir={results}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        dirs = [d for d in results.glob("*") if (d / "runs.parquet").exists()]
        if dirs and len(store.load(dirs[0]).runs) >= 2:
            break
        time.sleep(0.1)
    time.sleep(0.3)  # into the next level repeat
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err  # partial
    (run_dir,) = dirs
    return run_dir


def test_a_resumed_run_completes_every_level_once_and_keeps_what_was_complete(
    tmp_path: Path,
) -> None:
    run_dir = _interrupted_run(tmp_path / "results")
    before = store.load(run_dir)
    complete = before.runs[before.runs["status"] == "complete"]
    kept_ids = set(before.requests.merge(complete[["repeat", "level"]])["request_id"])
    assert 2 <= len(complete) < 6 and "partial" in set(before.runs["status"])

    proc = _bench(f"resume={run_dir}")
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert f"resumed: {len(complete)} level repeats already complete" in err

    after = store.load(run_dir)
    runs, reqs = after.runs, after.requests
    assert sorted(zip(runs["repeat"], runs["level"], strict=True)) == [
        (r, lv) for r in range(3) for lv in range(2)
    ]  # one row per level repeat: the partial one measured again, whole
    assert set(runs["status"]) == {"complete"} and runs["run_id"].nunique() == 1
    assert reqs["request_id"].is_unique and len(reqs) == 6 * 6
    for _, level in reqs.groupby(["repeat", "level"]):
        assert sorted(level["index"]) == list(range(6))
    assert kept_ids <= set(reqs["request_id"])  # nothing complete was measured again
    # The resumed rows come after the kept ones on the run's time axis.
    new = reqs[~reqs["request_id"].isin(kept_ids)]
    assert new["sent_s"].min() > before.requests["end_s"].max()
    assert not list(run_dir.glob("*.tmp"))


def test_resume_refuses_a_changed_configuration_and_a_finished_run(tmp_path: Path) -> None:
    run_dir = _interrupted_run(tmp_path / "results")
    changed = _bench(f"resume={run_dir}", "scenario.num_requests=7")
    _, err = changed.communicate(timeout=60)
    assert changed.returncode == 2 and "measured with another configuration" in err
    other = _bench(f"resume={run_dir}", "scenario=short_qa")
    _, err = other.communicate(timeout=60)
    assert other.returncode == 2 and "keeps its own scenario and target" in err
    finished = _bench(f"resume={run_dir}")
    assert finished.wait(timeout=180) == 0
    again = _bench(f"resume={run_dir}")
    _, err = again.communicate(timeout=60)
    assert again.returncode == 2 and "every level of that run is complete" in err
