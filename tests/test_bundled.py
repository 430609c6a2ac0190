"""`target=bundled`: the harness starts the bundled engine with `runtime.*` knobs, measures it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import store
from bench.targets import _free_port, _wait_healthy
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


@pytest.fixture
def tiny_server() -> Iterator[str]:
    """`python -m runtime serve --model tiny` on a free loopback port, as `make serve` starts it."""
    port = _free_port()
    cmd = [sys.executable, "-m", "runtime", "serve", "--model", "tiny", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, timeout_s=120)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("suffix", ["", "/v1"])
def test_a_running_engine_is_measured_with_the_default_workload(
    tiny_server: str, suffix: str, tmp_path: Path
) -> None:
    # No workload override: the default random ids reach 20000, past tiny's 2048; the model's
    # card tells the harness its vocabulary.
    out = _bench(f"target.base_url={tiny_server}{suffix}", f"results_dir={tmp_path}",
                 "scenario.num_requests=2", "scenario.repeats=1")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "vocabulary of 2048 ids" in out.stdout
    assert ("ends in /v1" in out.stdout) == (suffix == "/v1")
    (run_dir,) = _run_dirs(tmp_path)
    runs = store.load(run_dir).runs
    assert runs["success_rate"].tolist() == [1.0]
    assert runs["base_url"].tolist() == [tiny_server]
