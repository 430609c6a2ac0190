"""Stopping a run early on a signal: Ctrl-C (SIGINT), SIGTERM and SIGHUP alike.

Whatever the signal, what finished is kept, the level under way is recorded as partial with
the signal's name, and every child process is stopped by its owner on the way out.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Coroutine
from types import FrameType, TracebackType
from typing import Any


class Interrupted(BaseException):
    """A stop signal outside the measuring event loop, or before anything was measured (a
    BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way takes it
    for an error)."""


class StopSignals:
    """Ctrl-C (SIGINT), SIGTERM and SIGHUP stop a run alike, and cleanly.

    While the levels run, the first signal cancels the event loop's main task: sending stops,
    requests in flight are dropped, the level under way is recorded as partial with the reason
    ("interrupted by SIGTERM"), and `measure` returns that reason. Before then (the server
    starting, the workload being built) it raises Interrupted where the harness is; after
    (the stop itself) it is only noted, since everything was measured. A run interrupted
    before any request finished measured nothing: bench.runner.run raises Interrupted.

    Later signals are ignored while the run stops, which takes at most the server's grace
    period; SIGKILL ends the harness at once, and its child processes with it
    (runtime/lifetime.py). Handlers can only be set from the main thread; elsewhere the
    signals keep theirs.
    """

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")  # SIGHUP: the terminal closed (none on Windows)

    def __init__(self) -> None:
        self.reason: str | None = None  # set by the first signal
        self._previous: dict[int, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._measured = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                if (sig := getattr(signal, name, None)) is not None:
                    self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.reason is not None:
            return
        self.reason = f"interrupted by {signal.Signals(signum).name}"
        if self._loop is not None and self._task is not None:
            # From the loop's own thread, but between any two bytecodes of it: the cancel
            # runs as a loop callback, and the call wakes the loop from its select.
            self._loop.call_soon_threadsafe(self._task.cancel, self.reason)
        elif not self._measured:
            raise Interrupted(self.reason)

    async def measure(self, levels: Coroutine[Any, Any, str | None]) -> str | None:
        """Await `levels` as the task a signal cancels: its result, or the signal's reason."""
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        try:
            return await levels
        except asyncio.CancelledError:
            if self.reason is None:
                raise
            return self.reason
        finally:
            self._loop = self._task = None
            self._measured = True
