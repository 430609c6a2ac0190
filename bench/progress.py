"""Progress on stderr while a run measures: the current level and repeat, requests done, failures.

On a terminal it is a live display that the summary table replaces at the end. Elsewhere (a
pipe, a CI log) a live display would show nothing until the run ends, so each finished level
repeat is printed as one plain line instead, without terminal control codes:

    rep 1/5  64/128 c=4: 32/32 ok, 0 failed, 12.3 s

The runner announces each level repeat with `start_level` and each finished request with
`request_done`; a level repeat is over when the next one starts or the progress is closed.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


class LiveProgress:
    def __init__(
        self, total_requests: int | None, enabled: bool, console: Console | None = None
    ) -> None:
        console = console or Console(stderr=True)
        self._live = enabled and console.is_terminal
        self._lines = enabled and not self._live  # one plain line per finished level repeat
        self._progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            # Few redraws: the refresh thread competes for the GIL with the measuring loop.
            refresh_per_second=4,
            transient=True,  # the summary table replaces the bars
            disable=not self._live,
        )
        self._all = self._progress.add_task("all", total=total_requests, status="")
        self._level: TaskID | None = None
        self._description = ""
        self._total = self._ok = self._failed = 0
        self._started_s = self._last_done_s = 0.0

    def __enter__(self) -> LiveProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._level_done()
        self._progress.stop()

    def start_level(self, description: str, total: int) -> None:
        self._level_done()
        if self._level is not None:
            self._progress.remove_task(self._level)
        self._description, self._total = description, total
        self._ok = self._failed = 0
        self._started_s = self._last_done_s = time.perf_counter()
        self._level = self._progress.add_task(description, total=total, status="")

    def request_done(self, ok: bool) -> None:
        self._ok += ok
        self._failed += not ok
        self._last_done_s = time.perf_counter()
        status = f"ok {self._ok}" + (f" [red]failed {self._failed}[/]" if self._failed else "")
        if self._level is not None:
            self._progress.update(self._level, advance=1, status=status)
        self._progress.update(self._all, advance=1)

    def log(self, message: str) -> None:
        self._progress.console.print(message, soft_wrap=True)

    def _level_done(self) -> None:
        """Print the line of the level repeat that just ended, where lines are printed."""
        if not self._lines or not self._description:
            return
        # Up to its last finished request: the store's flush after a level is not its time.
        seconds = self._last_done_s - self._started_s
        self._progress.console.print(
            f"{self._description}: {self._ok}/{self._total} ok, {self._failed} failed, "
            f"{seconds:.1f} s",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
        self._description = ""
