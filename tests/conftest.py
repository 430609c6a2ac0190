"""Shared fixtures: a reference server in a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture
def refserver(tmp_path: Path) -> Iterator[Callable[..., tuple[str, Path]]]:
    """Start reference servers: refserver(--itl-ms=10, ...) -> (base_url, truth log path)."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> tuple[str, Path]:
        log = tmp_path / f"truth-{len(procs)}.jsonl"
        cmd = [sys.executable, "-m", "bench.refserver", "--port", "0", "--log-file", str(log)]
        proc = subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.match(r"READY (http://\S+)", line)
        assert match, f"refserver did not start: {line!r}"
        return match.group(1), log

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)
