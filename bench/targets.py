"""The server under test: an external one by URL, or one the harness starts and stops itself.

A managed server's load time is measured from process spawn to its first healthy response,
the figure people quote as "model load time".
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from bench.config import TargetConfig

# How a managed target kind is launched; `--host/--port/--model` are appended.
_COMMANDS = {"refserver": [sys.executable, "-m", "bench.refserver"]}


class TargetError(RuntimeError):
    """The server cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Server:
    base_url: str
    model: str
    load_time_s: float | None  # None for servers the harness did not start
    process: subprocess.Popen[bytes] | None = None

    def exit_code(self) -> int | None:
        """For a managed server: its exit code once it has died, else None."""
        return None if self.process is None else self.process.poll()


def _get(url: str, api_key: str | None, timeout_s: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def resolve_model(base_url: str, model: str | None, api_key: str | None) -> str:
    """Check the server answers and serves `model` (or pick its first model)."""
    url = f"{base_url}/v1/models"
    try:
        status, body = _get(url, api_key)
    except (urllib.error.URLError, OSError) as exc:
        raise TargetError(
            f"Cannot reach an OpenAI-compatible server at {base_url} ({exc}). Start the server, "
            "or point target.base_url at it (e.g. target.base_url=http://127.0.0.1:8000); to "
            "try the harness without a model, use target=refserver."
        ) from exc
    if status in (401, 403):
        raise TargetError(
            f"{url} refused the request (HTTP {status}): set target.api_key=... or the "
            "OPENAI_API_KEY environment variable."
        )
    served: list[str] = []
    if status == 200:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            served = [m["id"] for m in json.loads(body)["data"]]
    if model is None:
        if not served:
            raise TargetError(
                f"{url} did not list any model (HTTP {status}); name one with target.model=ID."
            )
        return served[0]
    if served and model not in served:
        raise TargetError(
            f"Model {model!r} is not served at {base_url}; it serves: {', '.join(served)}. "
            f"Set target.model to one of them."
        )
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_healthy(proc: subprocess.Popen[bytes], base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TargetError(f"the server exited with code {proc.returncode} while starting")
        with contextlib.suppress(urllib.error.URLError, OSError):
            if _get(f"{base_url}/health", None, timeout_s=1.0)[0] == 200:
                return
        time.sleep(0.02)
    raise TargetError(
        f"the server at {base_url} was not healthy after {timeout_s:.0f} s; raise "
        "target.startup_timeout_s if it needs longer to load"
    )


@contextlib.contextmanager
def serve(target: TargetConfig) -> Iterator[Server]:
    """Yield a ready server; a managed one is stopped (SIGTERM, then SIGKILL) on exit."""
    if not target.managed:
        assert target.base_url is not None
        model = resolve_model(target.base_url, target.model, target.api_key)
        yield Server(target.base_url, model, None)
        return
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [*_COMMANDS[target.kind], "--host", "127.0.0.1", "--port", str(port)]
    if target.model:
        cmd += ["--model", target.model]
    for key, value in target.server_args.items():
        cmd += [f"--{key}", str(value)]
    spawned = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        _wait_healthy(proc, base_url, target.startup_timeout_s)
        load_time_s = time.monotonic() - spawned
        yield Server(base_url, resolve_model(base_url, target.model, None), load_time_s, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
