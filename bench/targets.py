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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from bench.config import TargetConfig

# How a managed target kind is launched; `--host/--port/--model` are appended.
_COMMANDS = {
    "refserver": [sys.executable, "-m", "bench.refserver"],
    "bundled": [sys.executable, "-m", "runtime", "serve"],
}


class TargetError(RuntimeError):
    """The server cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Server:
    base_url: str
    model: str
    load_time_s: float | None  # None for servers the harness did not start
    process: subprocess.Popen[bytes] | None = None
    load_breakdown: dict[str, float] | None = None  # the engine's own, where it reports one
    kernels: dict[str, str] | None = None  # what computes its steps, where it reports it

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


def _model_cards(base_url: str, api_key: str | None) -> list[dict[str, Any]]:
    """The server's /v1/models entries; raises TargetError saying what to do if it fails."""
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
    cards: list[dict[str, Any]] = []
    if status == 200:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            cards = [m for m in json.loads(body)["data"] if isinstance(m.get("id"), str)]
    return cards


def _pick_model(base_url: str, cards: list[dict[str, Any]], model: str | None) -> str:
    """`model` if the server's cards list it (or list nothing), else the first one listed."""
    served: list[str] = [card["id"] for card in cards]
    if model is None:
        if not served:
            raise TargetError(
                f"{base_url}/v1/models did not list any model; name one with target.model=ID."
            )
        return served[0]
    if served and model not in served:
        raise TargetError(
            f"Model {model!r} is not served at {base_url}; it serves: {', '.join(served)}. "
            f"Set target.model to one of them."
        )
    return model


def _card_field(cards: list[dict[str, Any]], model: str, key: str) -> dict[str, Any] | None:
    """A mapping the engine reports of itself on `model`'s card, where it does (the bundled
    engine's card carries `load_breakdown` and `kernels`)."""
    for card in cards:
        if card["id"] == model and isinstance(card.get(key), dict):
            return card[key]  # type: ignore[no-any-return]
    return None


def _load_breakdown(cards: list[dict[str, Any]], model: str) -> dict[str, float] | None:
    """The engine's own account of its load time."""
    field = _card_field(cards, model, "load_breakdown")
    return None if field is None else {k: float(v) for k, v in field.items()}


def _kernels(cards: list[dict[str, Any]], model: str) -> dict[str, str] | None:
    """What the engine computes its steps with (attention backend, linear kernel, ...): a
    silent fallback shows in the records."""
    field = _card_field(cards, model, "kernels")
    return None if field is None else {str(k): str(v) for k, v in field.items()}


def _flags(server_args: Mapping[str, Any]) -> list[str]:
    """`{max_num_seqs: 64, enable_prefix_caching: true, seed: null}` -> `--max-num-seqs 64
    --enable-prefix-caching`: null keeps the server's default, a boolean is a bare flag."""
    flags: list[str] = []
    for key, value in server_args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not None and value is not False:
            flags += [flag, str(value)]
    return flags


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
        cards = _model_cards(target.base_url, target.api_key)
        model = _pick_model(target.base_url, cards, target.model)
        yield Server(target.base_url, model, None, kernels=_kernels(cards, model))
        return
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [*_COMMANDS[target.kind], "--host", "127.0.0.1", "--port", str(port)]
    if target.model:
        cmd += ["--model", target.model]
    cmd += _flags(target.server_args)
    spawned = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        _wait_healthy(proc, base_url, target.startup_timeout_s)
        load_time_s = time.monotonic() - spawned
        cards = _model_cards(base_url, None)  # once: the model and what it reports of itself
        model = _pick_model(base_url, cards, target.model)
        yield Server(base_url, model, load_time_s, proc, _load_breakdown(cards, model),
                     _kernels(cards, model))  # fmt: skip
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
