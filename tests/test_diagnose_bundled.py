"""`python -m bench.diagnose` on real runs of the bundled engine: each finding from its
configuration alone (a batch limit, a small KV cache, a trickle of requests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.diagnose import read_diagnosis
from bench.diagnosis import Diagnosis, Finding
from tests.test_harness import _bench, _run_dirs

pytestmark = pytest.mark.slow

# One level of 64 tokens in, 128 out; the server scraped often enough that a level of a few
# seconds has a dozen scrapes or more.
LEVEL = (
    "scenario=concurrency", "target=bundled", "scenario.repeats=1",
    "scenario.warmup_requests=1", "telemetry.server_metrics_interval_s=0.25",
    "runtime.max_model_len=256",
)  # fmt: skip


def _diagnose(tmp_path: Path, *overrides: str) -> tuple[str, Diagnosis]:
    """Run the level, then `python -m bench.diagnose` on it: its output and diagnosis.json."""
    out = _bench(*LEVEL, f"results_dir={tmp_path}", *overrides)
    assert out.returncode == 0, out.stderr
    (run_dir,) = _run_dirs(tmp_path)
    cli = [sys.executable, "-m", "bench.diagnose", f"run={run_dir}"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "timeline.png").is_file()
    return done.stdout, read_diagnosis(run_dir / "diagnosis.json")


def _rules(d: Diagnosis) -> set[str]:
    return {f.rule for f in d.findings}


def _finding(d: Diagnosis, rule: str) -> Finding:
    (found,) = [f for f in d.findings if f.rule == rule]
    return found


def test_two_batch_slots_for_eight_users_is_a_batch_cap(tmp_path: Path) -> None:
    out, d = _diagnose(
        tmp_path, "scenario.concurrency=[8]", "scenario.num_requests=32",
        "runtime.max_num_seqs=2", "runtime.num_kv_blocks=64",
    )  # fmt: skip
    assert "[batch_cap] Batch capped at 2 running requests while others wait" in out
    finding = _finding(d, "batch_cap")
    assert finding.evidence["ceiling"] == 2 and finding.evidence["max_num_seqs"] == 2
    assert "(= --max-num-seqs 2)" in finding.detail
    assert {"under_fed", "kv_pressure"}.isdisjoint(_rules(d))


def test_a_kv_cache_too_small_for_the_load_is_kv_pressure(tmp_path: Path) -> None:
    # 24 blocks of 16 tokens: two of the eight 192-token sequences fit, so the engine preempts.
    out, d = _diagnose(
        tmp_path, "scenario.concurrency=[8]", "scenario.num_requests=32",
        "runtime.num_kv_blocks=24",
    )  # fmt: skip
    assert "[kv_pressure]" in out
    assert _finding(d, "kv_pressure").evidence["preemptions"] > 0
    assert {"under_fed", "batch_cap"}.isdisjoint(_rules(d))


def test_one_request_every_two_seconds_is_under_fed(tmp_path: Path) -> None:
    out, d = _diagnose(
        tmp_path, "scenario.request_rate=0.5", "scenario.max_concurrency=1",
        "scenario.num_requests=6", "runtime.num_kv_blocks=64",
    )  # fmt: skip
    assert "[under_fed] Under-fed: the server had room to spare and nothing waited" in out
    finding = _finding(d, "under_fed")
    assert finding.level == "64/128 0.5/s ≤1"
    assert finding.evidence["waiting_share"] <= 0.05 and finding.evidence["idle_share"] > 0.2
    assert {"batch_cap", "kv_pressure", "queue_dominated_ttft"}.isdisjoint(_rules(d))
