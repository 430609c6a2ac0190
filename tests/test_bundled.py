"""`target=bundled`: the harness starts the bundled engine with `runtime.*` knobs, measures it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import store
from tests.test_harness import _bench, _run_dirs

pytestmark = pytest.mark.slow

SMALL_ENGINE = ("runtime.max_model_len=256", "runtime.num_kv_blocks=64")


def test_bundled_engine_is_started_with_its_knobs_and_measured(tmp_path: Path) -> None:
    out = _bench(
        "scenario=concurrency", "target=bundled", f"results_dir={tmp_path}",
        "scenario.concurrency=[4]", "scenario.num_requests=8", "scenario.repeats=1",
        "scenario.output_tokens=16", "scenario.warmup_requests=1",
        "runtime.max_num_seqs=2", *SMALL_ENGINE,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (run_dir,) = _run_dirs(tmp_path)
    data = store.load(run_dir)
    requests, (run,) = data.requests, data.runs.to_dict("records")
    assert requests["ok"].all() and (requests["output_tokens"] == 16).all()
    assert run["target_kind"] == "bundled" and run["model"] == "tiny"
    assert run["load_time_s"] > 0 and run["peak_rss_mib"] > 0
    breakdown = json.loads(run["load_breakdown_json"])
    assert {"read_s", "place_s", "kv_cache_s", "warmup_s"} <= set(breakdown)
    assert breakdown["kv_cache_bytes"] > 0
    # A float32 CPU engine with a compiler runs every C kernel; a fallback would show here.
    assert json.loads(run["engine_kernels_json"]) == {
        "attention": "cpu-kernel", "linear": "panel-gemm", "elementwise": "c", "cuda_graphs": "off",
    }  # fmt: skip
    # The server's own timings came back with every request, and fit inside the client's view.
    for column in ("server_queue_ms", "server_prefill_ms", "server_decode_ms", "server_e2e_ms"):
        assert requests[column].notna().all(), column
    assert (requests["server_e2e_ms"] <= requests["e2e_ms"]).all()
    # 4 users, 2 batch slots: half the requests wait about a whole request for a slot, which
    # only happens if --max-num-seqs 2 reached the engine.
    assert requests["server_queue_ms"].max() > 0.5 * requests["server_decode_ms"].median()


def test_a_bad_engine_knob_names_itself(tmp_path: Path) -> None:
    typo = _bench("target=bundled", f"results_dir={tmp_path}", "runtime.max_num_seq=2")
    assert typo.returncode != 0 and "max_num_seq" in typo.stderr
    bad = _bench("target=bundled", f"results_dir={tmp_path}", "runtime.max_num_seqs=0",
                 *SMALL_ENGINE)  # fmt: skip
    assert bad.returncode != 0
    assert "max_num_seqs: expected an integer >= 1, got 0" in bad.stderr
    assert "exited with code 2" in bad.stdout + bad.stderr
