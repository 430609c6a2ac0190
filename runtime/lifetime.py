"""Child processes that end with the process that started them, even one killed by SIGKILL.

A SIGKILLed process runs no cleanup, so its children must see to their own end:

- `exit_with_parent(pid)`, called early in a Python child (through `bind_to_parent` in the
  harness's telemetry sampler and the engine's tensor-parallel ranks), kills the child as soon
  as process `pid` has exited. A daemon thread waits on a pidfd (Linux 5.3+) or elsewhere polls
  the parent pid, so it follows the parent *process*: the kernel's parent-death signal follows
  the parent *thread*, and the engine starts its ranks from a model-loading thread that ends
  long before the engine does.
- `guarded(command)` is `command` run through `python -m runtime.lifetime`, which sets the
  kernel's parent-death signal (Linux prctl PR_SET_PDEATHSIG: SIGKILL when the thread that
  started it ends) and then execs the command: for commands that cannot call exit_with_parent
  themselves, such as a managed server of any kind. Start it from a thread that lives as long
  as the process (the main thread). Elsewhere than Linux the command runs unguarded.

Only stdlib imports: the harness uses this module without importing torch.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
POLL_S = 0.5  # how often the polling fallback looks at the parent pid


def _die() -> None:
    sigkill = getattr(signal, "SIGKILL", None)
    if sigkill is not None:
        os.kill(os.getpid(), sigkill)
    os._exit(1)


def _wait_for_exit(pid: int) -> None:
    """Return once process `pid`, this process's parent when called, has exited."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux 5.3+: poll
        while os.getppid() == pid:
            time.sleep(POLL_S)
        return
    try:
        # Opened first, checked second: if the parent is still ours now, the pidfd is of it
        # and not of a later process that reused its pid.
        if os.getppid() == pid:
            exited = select.poll()  # not select(): a pidfd may be past FD_SETSIZE
            exited.register(fd, select.POLLIN)
            exited.poll()  # readable once the process has exited
    finally:
        os.close(fd)


def exit_with_parent(parent_pid: int) -> None:
    """Kill this process (SIGKILL) once process `parent_pid`, its parent, has exited; at once
    if it already has."""
    if os.getppid() != parent_pid:
        _die()

    def watch() -> None:
        _wait_for_exit(parent_pid)
        _die()

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def bind_to_parent(parent_pid: int) -> None:
    """For a helper process that its parent starts and stops (the sampler, a rank): ignore a
    terminal's Ctrl-C and hang-up, which reach the whole foreground process group and which the
    parent handles for both, and exit with the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):  # not on Windows
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    exit_with_parent(parent_pid)


def parent_death_signal() -> bool:
    """Have the kernel SIGKILL this process when the thread that started it ends; False where
    that is not available (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # only here: the sampler and the ranks do not need it

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def guarded(command: Sequence[str]) -> list[str]:
    """`command`, run so that the kernel SIGKILLs it when the thread that starts it ends: start
    it from the main thread, which ends with the process (see the module docstring). `command`
    itself where the kernel cannot do that."""
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-m", "runtime.lifetime", str(os.getpid()), *command]


def main(argv: Sequence[str]) -> None:
    """`python -m runtime.lifetime PARENT_PID COMMAND...`: exec COMMAND with the parent-death
    signal set, unless PARENT_PID is already gone."""
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit("usage: python -m runtime.lifetime PARENT_PID COMMAND [ARG...]")
    parent_death_signal()
    if os.getppid() != int(argv[0]):  # the parent ended before the signal was set
        sys.exit(1)
    os.execvp(argv[1], list(argv[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
