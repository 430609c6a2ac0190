"""`torchrun --nproc-per-node 2 -m runtime serve --tensor-parallel-size 2`, launched for real.

torchrun's agent starts both ranks; rank 0 serves HTTP and rank 1 only runs its shard. The
test serves greedy completions, compares them with one process's engine, then stops the agent
as a user or a scheduler would (SIGTERM) and checks that no rank outlives it. Everything stays
on loopback: the rendezvous address, gloo's interface and the HTTP server's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch.distributed as dist

from runtime.config import EngineConfig
from tests.runtime.test_server import Served, free_port, get, get_json, post, wait_until
from tests.runtime.test_tensor_parallel import GREEDY, PROMPTS, TINY

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

START_S = 45.0  # import, rendezvous, load and warm-up of two ranks on two busy cores take ~5 s
EXIT_S = 15.0  # torchrun's agent SIGKILLs a rank still running 30 s after its SIGTERM
# Left unset, so the engine's own choice is what is tested: ranks that meet on 127.0.0.1 talk
# over loopback (runtime/parallel.py), whatever the hostname resolves to.
INTERFACE_ENV = ("GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME")


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # the store's IPv6 socket shows ::ffff:127...
    return (mapped or address).is_loopback


def _off_loopback(procs: list[psutil.Process], store_port: int) -> list[str]:
    """The sockets of `procs` bound or connected anywhere but loopback, save one: torch's
    TCPStore server (the rendezvous store in the agent) binds every address and has no option
    to narrow that, so it is allowed as long as every connection to it is over loopback."""
    stray = []
    for proc in procs:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == store_port:
                continue
            if not _loopback(conn.laddr.ip) or (conn.raddr and not _loopback(conn.raddr.ip)):
                stray.append(f"{proc.pid}: {conn}")
    return stray


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gloo path on every machine, for the reference engine and the launched ranks alike:
    one GPU cannot hold two ranks, and a CUDA reference would run in another dtype."""
    monkeypatch.setenv("RUNTIME_DEVICE", "cpu")


@dataclass
class Launch:
    agent: psutil.Popen
    url: str  # rank 0's server
    store_port: int  # the agent's rendezvous store
    log: Path  # the agent's and the ranks' output
    family: list[psutil.Process]  # every process seen so far, the agent first


@pytest.fixture
def launch(tmp_path: Path, cpu_only: None) -> Iterator[Launch]:
    """torchrun serving tiny at 2 ranks. Whatever the test did, no process it saw is left."""
    store_port, http_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(store_port),
        "-m", "runtime", "serve", "--model", "tiny", "--tensor-parallel-size", "2",
        "--host", "127.0.0.1", "--port", str(http_port), "--seed", str(TINY.seed),
        "--max-model-len", str(TINY.max_model_len), "--num-kv-blocks", str(TINY.num_kv_blocks),
    ]  # fmt: skip
    log_path = tmp_path / "torchrun.log"
    with log_path.open("w") as log:
        env = {k: v for k, v in os.environ.items() if k not in INTERFACE_ENV}
        agent = psutil.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    launched = Launch(agent, f"http://127.0.0.1:{http_port}", store_port, log_path, [agent])
    try:
        yield launched
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            launched.family.extend(agent.children(recursive=True))
        for proc in launched.family:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        agent.wait(EXIT_S)


@pytest.mark.slow
def test_torchrun_ranks_serve_the_tokens_of_one_process_and_exit_on_sigterm(
    launch: Launch,
) -> None:
    from runtime.__main__ import load

    # The reference: one process's engine behind the same server code, asked one request at a
    # time as the ranks will be, so that both run the same batches and detokenise alike.
    bodies = [{"model": "tiny", "prompt": prompt, "max_tokens": GREEDY.max_tokens,
               "temperature": 0, "ignore_eos": True} for prompt in PROMPTS]  # fmt: skip
    one = Served(lambda: load(EngineConfig(**vars(TINY))), name="tiny")
    try:
        one.wait_healthy(START_S)
        expected = [post(one.url + "/v1/completions", body) for body in bodies]
    finally:
        one.close()
    assert all(reply.status == 200 for reply in expected), expected

    def healthy() -> bool:
        assert launch.agent.poll() is None, launch.log.read_text()
        try:
            return get(launch.url + "/health")[0] == 200
        except OSError:  # not listening yet
            return False

    wait_until(healthy, timeout_s=START_S)
    ranks = launch.agent.children()
    launch.family.extend(launch.agent.children(recursive=True))
    assert sorted(int(p.environ()["RANK"]) for p in ranks) == [0, 1]
    # Under torchrun rank 0 joins the agent's rank 1 instead of spawning one of its own.
    assert len(launch.family) == 1 + len(ranks)
    assert get(launch.url + "/health") == (200, "ok")
    models = get_json(launch.url + "/v1/models")
    assert [model["id"] for model in models.body["data"]] == ["tiny"]

    for body, reference in zip(bodies, expected, strict=True):
        reply = post(launch.url + "/v1/completions", body)
        assert reply.status == 200, reply.body
        assert reply.body["choices"] == reference.body["choices"]
        assert reply.body["usage"]["completion_tokens"] == GREEDY.max_tokens

    assert _off_loopback(launch.family, launch.store_port) == []

    launch.agent.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(launch.family, timeout=EXIT_S)
    assert alive == [], launch.log.read_text()
