"""Ctrl-C, SIGTERM, SIGHUP and SIGKILL of a run: partial results kept, no process left behind.

The end-to-end tests start `python -m bench target=bundled` in its own session (as a shell
starts a job), signal it mid-run the way a terminal or `kill` would, and then require every
process it had started (the engine server, its tensor-parallel ranks, the telemetry sampler,
multiprocessing's resource trackers) to be gone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from bench import store
from bench.stop_signals import StopSignals
from bench.telemetry import Sampler
from tests.test_bundled import SMALL_ENGINE

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")
STOP_WITHIN_S = 10.0


def _alive(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Those of `procs` still running (zombies count as exited) after up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


# --- the pieces, in-process ------------------------------------------------------------------


@LINUX
def test_the_sampler_ignores_ctrl_c_and_stops_when_told() -> None:
    # A terminal's Ctrl-C reaches the sampler too (same process group); the harness stops it.
    with Sampler(interval_s=0.02) as sampler:
        process = sampler._process
        assert process is not None and process.pid is not None
        time.sleep(1.0)  # past the spawned interpreter's start-up, into the sampling loop
        os.kill(process.pid, signal.SIGINT)
        time.sleep(0.3)
        assert process.is_alive()
    assert process.exitcode == 0


@LINUX
@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_stop_signal_cancels_the_levels_and_names_itself(name: str) -> None:
    async def levels() -> str | None:
        os.kill(os.getpid(), getattr(signal, name))
        await asyncio.sleep(10)
        return None

    before = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    with StopSignals() as signals:
        assert asyncio.run(signals.measure(levels())) == f"interrupted by {name}"
    assert time.monotonic() - started < 5
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handlers are back


# --- end to end (slow) -----------------------------------------------------------------------

# Many short levels: the run is measuring whenever the signal comes, and stops at it.
RUN = (
    "scenario=concurrency",
    "target=bundled",
    "scenario.concurrency=[2]",
    "scenario.num_requests=8",
    "scenario.repeats=100",
    "scenario.output_tokens=16",
    "scenario.warmup_requests=1",
    "baseline.save=null",
    "progress=false",
    *SMALL_ENGINE,
)


class _Bench:
    """`python -m bench` in its own session, its output in files (an orphan holding a pipe
    open would hang a reader)."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.results = tmp_path / "results"
        self.out, self.err = tmp_path / "stdout", tmp_path / "stderr"
        self.seen: list[psutil.Process] = []  # every descendant looked at, to clean up after
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench", *RUN, f"results_dir={self.results}", *args],
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    def wait_until_measured(self, timeout_s: float = 180) -> None:
        """Until the first load level is on disk."""
        deadline = time.monotonic() + timeout_s
        while not list(self.results.glob("*/runs.parquet")):
            assert self.proc.poll() is None, self.err.read_text()
            assert time.monotonic() < deadline, "no level finished"
            time.sleep(0.05)

    def descendants(self) -> list[psutil.Process]:
        procs = psutil.Process(self.proc.pid).children(recursive=True)
        self.seen += procs
        return procs

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _server(procs: list[psutil.Process]) -> psutil.Process:
    (server,) = [p for p in procs if "runtime" in p.cmdline() and "serve" in p.cmdline()]
    return server


def _check_children(bench: _Bench, tensor_parallel: int, workers: int) -> list[psutil.Process]:
    """The harness's descendants while it measures, having checked the ones that matter are
    among them: the server, its spawned ranks, the sampler and the client's worker processes."""
    procs = bench.descendants()
    server = _server(procs)
    spawned = [p for p in procs if any("spawn_main" in arg for arg in p.cmdline())]
    ranks = [p for p in spawned if p.ppid() == server.pid]
    helpers = [p for p in spawned if p.ppid() == bench.proc.pid]  # the sampler, the workers
    expected = 1 + (workers if workers > 1 else 0)
    assert len(ranks) == tensor_parallel - 1 and len(helpers) == expected, [
        p.cmdline() for p in procs
    ]
    return procs


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Callable[..., _Bench]]:
    """Start `python -m bench` runs; each is killed at the end with whatever it left."""
    started: list[_Bench] = []

    def start(*args: str) -> _Bench:
        started.append(_Bench(tmp_path, *args))
        return started[-1]

    yield start
    for b in started:
        if b.proc.poll() is None:
            b.descendants()
            b.stop()
        for p in _alive(b.seen, 0):
            p.kill()


@LINUX
@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "tensor_parallel", "workers"),
    [("SIGTERM", 1, 1), ("SIGHUP", 1, 1), ("SIGINT", 1, 1), ("SIGTERM", 2, 1), ("SIGINT", 1, 2)],
    ids=["SIGTERM", "SIGHUP", "SIGINT", "SIGTERM-tp2", "SIGINT-workers2"],
)
def test_a_stop_signal_mid_run_keeps_what_finished_and_leaves_no_process(
    bench: Callable[..., _Bench], name: str, tensor_parallel: int, workers: int
) -> None:
    run = bench(f"runtime.tensor_parallel_size={tensor_parallel}", f"client.workers={workers}")
    run.wait_until_measured()
    procs = _check_children(run, tensor_parallel, workers)
    sig = getattr(signal, name)
    if name == "SIGTERM":  # kill -TERM PID
        run.proc.send_signal(sig)
    else:  # Ctrl-C or a closed terminal: the whole foreground process group
        os.killpg(run.proc.pid, sig)
    assert _alive(procs, STOP_WITHIN_S) == []
    assert run.proc.wait(timeout=60) == 1
    stderr, stdout = run.err.read_text(), run.out.read_text()
    assert f"run is partial: interrupted by {name}" in stderr
    assert "Traceback" not in stderr + stdout
    (run_dir,) = run.results.iterdir()
    data = store.load(run_dir)
    levels = data.runs.to_dict("records")
    assert [r["status"] for r in levels] == ["complete"] * (len(levels) - 1) + ["partial"]
    assert levels[-1]["stopped_early"] == f"interrupted by {name}"
    assert len(data.requests) == sum(r["sent"] for r in levels) >= 8  # every finished request
    assert data.requests["ok"].all()  # and no request the stop cut short


@LINUX
@pytest.mark.slow
@pytest.mark.parametrize(
    ("tensor_parallel", "workers"), [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "workers2"]
)
def test_a_killed_harness_leaves_no_process(
    bench: Callable[..., _Bench], tensor_parallel: int, workers: int
) -> None:
    run = bench(f"runtime.tensor_parallel_size={tensor_parallel}", f"client.workers={workers}")
    run.wait_until_measured()
    procs = _check_children(run, tensor_parallel, workers)
    run.proc.kill()
    assert _alive(procs, STOP_WITHIN_S) == []


@LINUX
@pytest.mark.slow
def test_a_stop_signal_while_the_server_starts_stops_it_and_measures_nothing(
    bench: Callable[..., _Bench],
) -> None:
    run = bench()
    deadline = time.monotonic() + 60
    while not [p for p in run.descendants() if "serve" in p.cmdline()]:
        assert time.monotonic() < deadline and run.proc.poll() is None
        time.sleep(0.02)
    procs = run.descendants()
    server = _server(procs)
    assert server.is_running()
    run.proc.send_signal(signal.SIGTERM)
    assert _alive(procs, STOP_WITHIN_S) == []
    assert run.proc.wait(timeout=60) == 2
    stderr = run.err.read_text()
    assert "interrupted by SIGTERM before any request was measured" in stderr
    assert "Traceback" not in stderr
    assert not run.results.exists() or not list(run.results.iterdir())
