"""Live progress on stderr: the current level and repeat, requests done, failures so far."""

from __future__ import annotations

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
    def __init__(self, total_requests: int, enabled: bool) -> None:
        self._progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            # Few redraws: the refresh thread competes for the GIL with the measuring loop.
            refresh_per_second=4,
            transient=True,  # the summary table replaces the bars
            disable=not enabled,
        )
        self._all = self._progress.add_task("all", total=total_requests, status="")
        self._level: TaskID | None = None
        self._ok = self._failed = 0

    def __enter__(self) -> LiveProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def start_level(self, description: str, total: int) -> None:
        if self._level is not None:
            self._progress.remove_task(self._level)
        self._ok = self._failed = 0
        self._level = self._progress.add_task(description, total=total, status="")

    def request_done(self, ok: bool) -> None:
        self._ok += ok
        self._failed += not ok
        status = f"ok {self._ok}" + (f" [red]failed {self._failed}[/]" if self._failed else "")
        if self._level is not None:
            self._progress.update(self._level, advance=1, status=status)
        self._progress.update(self._all, advance=1)

    def log(self, message: str) -> None:
        self._progress.console.print(message, soft_wrap=True)
