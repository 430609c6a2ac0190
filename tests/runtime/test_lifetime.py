"""Child processes end with their parent, even a SIGKILLed one (runtime/lifetime.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux signals")

# Starts one child, prints its pid and waits to be killed. "watch": the child watches this
# process itself, and is started from a thread that ends at once, as the engine starts its
# ranks from its model-loading thread. "guarded": the kernel's parent-death signal, set for a
# child started from the main thread.
PARENT = """
import os, subprocess, sys, threading, time
from runtime.lifetime import guarded
mode, command = sys.argv[1], sys.argv[2:]
if mode == "guarded":
    child = subprocess.Popen(guarded(command))
else:
    children = []
    start = lambda: children.append(subprocess.Popen([*command, str(os.getpid())]))
    starter = threading.Thread(target=start)
    starter.start()
    starter.join()
    child = children[0]
print(child.pid, flush=True)
time.sleep(60)
"""
WATCHER = (
    "import sys, time; from runtime.lifetime import exit_with_parent; "
    "exit_with_parent(int(sys.argv[1])); time.sleep(60)"
)
# The same where there is no pidfd (not Linux 5.3+): the watcher polls the parent pid.
POLLING_WATCHER = "import os; del os.pidfd_open; " + WATCHER
SLEEPER = "import time; time.sleep(60)"


def _gone(proc: psutil.Process, timeout_s: float) -> bool:
    """Whether `proc` has exited (a zombie has) within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def family() -> Iterator[list[psutil.Process]]:
    """[parent, child] of PARENT's; both are killed at the end, whatever the test did."""
    procs: list[psutil.Process] = []
    yield procs
    for proc in procs:
        if proc.is_running():
            proc.kill()


def _start(
    family: list[psutil.Process], mode: str, code: str
) -> tuple[psutil.Popen, psutil.Process]:
    parent = psutil.Popen(
        [sys.executable, "-c", PARENT, mode, sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
    )
    family.append(parent)
    child = psutil.Process(int(parent.stdout.readline()))
    family.append(child)
    return parent, child


@pytest.mark.parametrize("watcher", [WATCHER, POLLING_WATCHER], ids=["pidfd", "polling"])
def test_a_watching_child_outlives_the_thread_that_started_it_but_not_its_parent(
    family: list[psutil.Process], watcher: str
) -> None:
    parent, child = _start(family, "watch", watcher)
    assert not _gone(child, 1.0)
    parent.kill()
    assert _gone(child, 5.0)


def test_a_guarded_command_is_killed_with_its_parent(family: list[psutil.Process]) -> None:
    parent, child = _start(family, "guarded", SLEEPER)
    deadline = time.monotonic() + 10
    while SLEEPER not in child.cmdline() and time.monotonic() < deadline:
        time.sleep(0.02)  # the wrapper execs the command: same process, new command line
    assert SLEEPER in child.cmdline()
    parent.kill()
    assert _gone(child, 5.0)


def test_a_guarded_command_does_not_start_once_its_parent_is_gone(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    gone = subprocess.Popen(["true"])
    gone.wait()
    wrapper = [sys.executable, "-m", "runtime.lifetime"]
    late = subprocess.run([*wrapper, str(gone.pid), "touch", str(marker)], timeout=30)
    assert late.returncode == 1 and not marker.exists()
    ours = subprocess.run([*wrapper, str(psutil.Process().pid), "touch", str(marker)], timeout=30)
    assert ours.returncode == 0 and marker.exists()


def test_exit_with_parent_ends_a_child_at_once_if_the_parent_is_already_gone() -> None:
    code = "from runtime.lifetime import exit_with_parent; exit_with_parent(1); print('ran on')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == -signal.SIGKILL and "ran on" not in out.stdout


@pytest.mark.slow
def test_a_spawned_rank_ends_when_its_engine_is_killed_while_starting(
    family: list[psutil.Process],
) -> None:
    # Before the ranks have joined their group, no collective can fail to tell them.
    flags = "--port 0 --tensor-parallel-size 2 --max-model-len 256 --num-kv-blocks 64"
    engine = psutil.Popen([sys.executable, "-m", "runtime", "serve", *flags.split()])
    family.append(engine)
    deadline = time.monotonic() + 60
    while not (ranks := [p for p in engine.children() if "spawn_main" in " ".join(p.cmdline())]):
        assert time.monotonic() < deadline and engine.poll() is None
        time.sleep(0.01)
    family.extend(ranks)
    engine.kill()
    assert _gone(ranks[0], 10.0)
