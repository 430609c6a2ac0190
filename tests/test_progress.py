"""Progress while a run measures: a live display on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io
import re

from rich.console import Console

from bench.progress import LiveProgress


def _measure(progress: LiveProgress, outcomes: dict[str, list[bool]]) -> None:
    """What the runner does: announce each level repeat, then report each request."""
    for description, oks in outcomes.items():
        progress.start_level(description, 4)
        for ok in oks:
            progress.request_done(ok)


def _piped(enabled: bool = True) -> tuple[LiveProgress, io.StringIO]:
    stream = io.StringIO()
    return LiveProgress(8, enabled, Console(file=stream)), stream


def test_without_a_terminal_each_finished_level_repeat_is_one_plain_line() -> None:
    progress, stream = _piped()
    with progress:
        progress.log("run r: writing to results/runs/r")
        _measure(
            progress, {"rep 1/2  64/128 c=4": [True] * 4, "rep 2/2  64/128 c=4": [True, False]}
        )
    lines = stream.getvalue().splitlines()
    assert lines[0] == "run r: writing to results/runs/r"
    assert re.fullmatch(r"rep 1/2  64/128 c=4: 4/4 ok, 0 failed, \d+\.\d s", lines[1])
    # A level cut short says how far it got.
    assert re.fullmatch(r"rep 2/2  64/128 c=4: 1/4 ok, 1 failed, \d+\.\d s", lines[2])
    assert len(lines) == 3


def test_without_a_terminal_nothing_uses_terminal_control_codes() -> None:
    progress, stream = _piped()
    with progress:
        _measure(progress, {"rep 1/1  64/128 c=1": [False, True, True, True]})
    assert stream.getvalue() and "\x1b" not in stream.getvalue()


def test_a_level_repeat_is_reported_once_it_is_over() -> None:
    progress, stream = _piped()
    with progress:
        _measure(progress, {"rep 1/2  64/128 c=1": [True] * 4})
        assert stream.getvalue() == ""  # the level may still be running
        _measure(progress, {"rep 2/2  64/128 c=1": [True] * 4})
        assert stream.getvalue().startswith("rep 1/2  64/128 c=1: 4/4 ok")
    assert "rep 2/2  64/128 c=1: 4/4 ok" in stream.getvalue()


def test_with_progress_disabled_no_level_is_reported() -> None:
    progress, stream = _piped(enabled=False)
    with progress:
        _measure(progress, {"rep 1/1  64/128 c=1": [True] * 4})
    assert stream.getvalue() == ""


def test_on_a_terminal_the_live_display_replaces_the_plain_lines() -> None:
    stream = io.StringIO()
    with LiveProgress(4, True, Console(file=stream, force_terminal=True)) as progress:
        _measure(progress, {"rep 1/1  64/128 c=1": [True] * 4})
    shown = stream.getvalue()
    assert "64/128 c=1" in shown and "0 failed" not in shown
