"""The server under test: an external one by URL, or one the harness starts and stops itself.

A managed server's load time is measured from process spawn to its first healthy response,
the figure people quote as "model load time".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
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
from runtime.lifetime import guarded

# How a managed target kind is launched; `--host/--port/--model` are appended.
_COMMANDS = {
    "refserver": [sys.executable, "-m", "bench.refserver"],
    "bundled": [sys.executable, "-m", "runtime", "serve"],
}


API_PREFIX = "/v1"
log = logging.getLogger(__name__)


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
    vocab_size: int | None = None  # the model's vocabulary, where the server reports it

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


def api_root(base_url: str) -> str:
    """The server's root URL, to which the harness appends `/v1/...` itself. The OpenAI SDK's
    form, which ends in `/v1` (http://127.0.0.1:8000/v1), is accepted: its `/v1` is dropped,
    and the log says so once."""
    root = base_url.rstrip("/")
    if root.endswith(API_PREFIX):
        root = root.removesuffix(API_PREFIX)
        log.info(
            "target.base_url %s ends in %s; requests go to %s%s/...",
            base_url,
            API_PREFIX,
            root,
            API_PREFIX,
        )
    return root


def _model_cards(base_url: str, api_key: str | None) -> list[dict[str, Any]]:
    """The server's /v1/models entries; raises TargetError saying what to do if it fails."""
    url = f"{base_url}{API_PREFIX}/models"
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
    if status == 404:
        raise TargetError(
            f"{url} answered HTTP 404: no OpenAI-compatible API there. Point target.base_url at "
            f"the server's root (http://HOST:PORT, or http://HOST:PORT/v1), not at an endpoint."
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
                f"{base_url}{API_PREFIX}/models did not list any model; name one with "
                "target.model=ID."
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


def _vocab_size(cards: list[dict[str, Any]], model: str) -> int | None:
    """The size of `model`'s vocabulary where its card says (the bundled engine's does):
    random prompt token ids must stay below it."""
    for card in cards:
        size = card.get("vocab_size")
        if card["id"] == model and isinstance(size, int) and not isinstance(size, bool):
            return size
    return None


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


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM to a managed server, `grace_s` to stop (the bundled engine stops its ranks),
    then SIGKILL to its whole process group: whatever it started goes with it."""
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    if hasattr(os, "killpg"):  # its session's group: the server's pid (start_new_session)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()
    proc.wait()


@contextlib.contextmanager
def serve(target: TargetConfig) -> Iterator[Server]:
    """Yield a ready server; a managed one is stopped on exit (see `_stop`).

    A managed server runs in its own session, so a terminal's Ctrl-C or hang-up reaches only
    the harness, which stops it after a clean stop of its own; and it is SIGKILLed by the
    kernel if the harness ends without stopping it (`guarded`)."""
    if not target.managed:
        assert target.base_url is not None
        base_url = api_root(target.base_url)
        cards = _model_cards(base_url, target.api_key)
        model = _pick_model(base_url, cards, target.model)
        yield Server(
            base_url,
            model,
            load_time_s=None,
            kernels=_kernels(cards, model),
            vocab_size=_vocab_size(cards, model),
        )
        return
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [*_COMMANDS[target.kind], "--host", "127.0.0.1", "--port", str(port)]
    if target.model:
        cmd += ["--model", target.model]
    cmd += _flags(target.server_args)
    spawned = time.monotonic()
    proc = subprocess.Popen(guarded(cmd), stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_healthy(proc, base_url, target.startup_timeout_s)
        load_time_s = time.monotonic() - spawned
        cards = _model_cards(base_url, None)  # once: the model and what it reports of itself
        model = _pick_model(base_url, cards, target.model)
        yield Server(
            base_url,
            model,
            load_time_s,
            proc,
            load_breakdown=_load_breakdown(cards, model),
            kernels=_kernels(cards, model),
            vocab_size=_vocab_size(cards, model),
        )
    finally:
        _stop(proc)


# What a server's refusal says -> which setting of ours it refused. Matched in the lowered
# message; the first match wins.
_REFUSALS = (
    (
        ("token id", "token_id", "vocab"),
        "The prompts' random token ids are outside the model's vocabulary: lower "
        "workload.token_id_high below its vocabulary size (and workload.token_id_low), or set "
        "target.tokenizer to draw them from the model's own tokenizer.",
    ),
    (
        ("ignore_eos",),
        "The server refuses ignore_eos: set target.ignore_eos=false (output lengths then vary).",
    ),
    (
        ("stream_options", "continuous_usage_stats", "include_usage"),
        "The server refuses stream_options: set target.continuous_usage_stats=false.",
    ),
    (
        ("context length", "max_model_len", "maximum context", "too long"),
        "The requests are longer than the model takes: lower scenario.input_tokens or "
        "scenario.output_tokens, or raise the server's --max-model-len.",
    ),
    (("model",), "Check target.model against the models the server lists at /v1/models."),
)


def refusal_hint(http_status: int | None, message: str | None) -> str:
    """What to change, from the server's own account of why it refused a request."""
    text = (message or "").lower()
    if http_status in (401, 403):
        return "The server wants a key: set target.api_key=... or OPENAI_API_KEY."
    for needles, hint in _REFUSALS:
        if any(n in text for n in needles):
            return hint
    if http_status == 404:
        return (
            "Check target.endpoint (completions or chat) and that target.base_url is the "
            "server's root."
        )
    return (
        "The server's message above says what it refused. What the harness sets in each "
        "request: target.model, target.endpoint, ignore_eos (target.ignore_eos), "
        "stream_options.continuous_usage_stats (target.continuous_usage_stats), "
        "target.extra_body, and random prompt token ids in [workload.token_id_low, "
        "workload.token_id_high)."
    )
