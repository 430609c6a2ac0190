"""A tensor-parallel rank killed mid-request, end to end.

`python -m runtime serve --tensor-parallel-size 2` spawns rank 1 itself (gloo over loopback);
SIGKILL it while a request streams. The stream must end with an error (an SSE error event or
a dropped connection) and the server must exit non-zero within seconds, its log naming the dead
rank: an engine that lost a rank can never step again, so a server that stayed up would only
answer errors until someone noticed. A harness run against such a server comes back partial,
with every request that finished before the kill on disk.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from runtime.async_engine import AsyncEngine, EngineDeadError
from runtime.sequence import SamplingParams
from tests.runtime.fake_core import FakeCore
from tests.runtime.test_server import metric, sse_data, start_cli, wait_until

EXIT_S = 15.0  # from the kill to the server's exit
# Why the server does not exit yet; runtime/server.py's serve() is the place to fix it.


@dataclass
class TpServer:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def rank_1(self) -> psutil.Process:
        """The rank the engine spawned (the resource tracker is its child too, not a rank)."""
        children = psutil.Process(self.process.pid).children(recursive=True)
        ranks = [p for p in children if any("spawn_main" in a for a in p.cmdline())]
        assert len(ranks) == 1, [p.cmdline() for p in children]
        return ranks[0]

    def wait_exit(self, timeout_s: float) -> int:
        return self.process.wait(timeout=timeout_s)


@pytest.fixture
def tp_server(tmp_path: Path) -> Iterator[TpServer]:
    log = tmp_path / "serve.log"
    process, url = start_cli(log, "--tensor-parallel-size", "2")
    try:
        yield TpServer(process, url, log)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def _stream(url: str, max_tokens: int) -> http.client.HTTPResponse:
    body = {"prompt": "The server", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(),
        {"Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=EXIT_S)
    return response


@pytest.mark.slow
def test_a_rank_killed_mid_stream_ends_the_stream_and_the_server_naming_the_rank(
    tp_server: TpServer,
) -> None:
    rank = tp_server.rank_1()
    with _stream(tp_server.url, max_tokens=240) as response:
        events = sse_data(response)
        first = next(events)
        assert "choices" in json.loads(first)  # a token, before the kill
        rank.kill()
        killed = time.monotonic()
        rest: list[str] = []
        dropped = False
        try:
            rest.extend(events)
        except (http.client.IncompleteRead, ConnectionError):
            dropped = True  # an error the client sees too
    chunks = [json.loads(p) for p in rest if p != "[DONE]"]
    errors = [c["error"] for c in chunks if "error" in c]
    finished = [c for c in chunks if "error" not in c and c["choices"][0]["finish_reason"]]
    assert not finished, "the stream ran to its end although rank 1 was killed"
    assert errors or dropped, f"the stream ended without an error: {rest[-3:]}"
    if errors:  # the server said why before the connection closed
        assert errors[-1]["type"] == "internal_server_error"
        assert "rank 1" in errors[-1]["message"], errors[-1]
    wait_until(lambda: "rank 1" in tp_server.log.read_text(), EXIT_S)
    code = tp_server.wait_exit(max(0.0, EXIT_S - (time.monotonic() - killed)))
    exit_s = time.monotonic() - killed
    print(f"\nRANK FAULT: server exited {exit_s:.1f} s after rank 1 was killed, code {code}")
    assert code != 0
    assert "rank 1" in tp_server.log.read_text()


@pytest.mark.slow
def test_a_rank_killed_mid_run_leaves_a_partial_run_with_every_finished_request(
    tp_server: TpServer, tmp_path: Path
) -> None:
    from bench import runner, store
    from bench.compose import compose

    finished_before_kill: list[float] = []

    def kill_once_some_requests_finished() -> None:
        # Once measured requests are finishing (warm-up is 2), not at a fixed time: a busy
        # machine can take seconds to start the run.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                url = tp_server.url
                done = metric(url, "vllm:request_success_total", finished_reason="length")
            except AssertionError:  # no request has finished yet: no sample
                done = 0
            if done >= 8:
                finished_before_kill.append(done)
                break
            time.sleep(0.05)
        tp_server.rank_1().kill()

    killer = threading.Thread(target=kill_once_some_requests_finished, daemon=True)
    killer.start()
    result = runner.run(compose(
        "scenario=short_qa", "target=openai", f"target.base_url={tp_server.url}",
        "target.model=tiny", f"results_dir={tmp_path / 'results'}", "progress=false",
        "scenario.concurrency=2", "scenario.num_requests=200", "scenario.repeats=1",
        "scenario.input_tokens=16", "scenario.output_tokens=24",
    ))  # fmt: skip
    killer.join(5)
    assert finished_before_kill, "the run ended before the kill"
    assert result.status == "partial", result.reason
    assert result.reason is not None and "unreachable" in result.reason
    assert tp_server.wait_exit(EXIT_S) != 0
    data = store.load(result.run_dir)
    on_disk = set(data.requests.loc[data.requests["ok"], "request_id"])
    assert on_disk == {r.request_id for r in result.requests if r.ok}
    assert len(on_disk) >= 6  # the kill came after 8 finished, 2 of them warm-up
    failed = data.requests.loc[~data.requests["ok"]]
    # In flight at the kill: an SSE error event or a dropped stream; sent between the engine's
    # failure and the server's exit: a 500; after it: refused connections.
    assert set(failed["error"]) <= {"connection", "disconnected", "server_error", "http"}
    assert set(failed.loc[failed["error"] == "http", "http_status"]) <= {500}


def test_wait_failed_returns_the_error_of_a_failed_engine_thread_and_not_of_a_stop() -> None:
    async def scenario() -> None:
        stopped = AsyncEngine(FakeCore())
        stopped.start()
        waiting = asyncio.create_task(stopped.wait_failed())
        await stopped.stop()
        await asyncio.sleep(0.05)
        assert not waiting.done()  # a stop is no failure
        waiting.cancel()

        core = FakeCore()
        failing = AsyncEngine(core)
        failing.start()
        waiting = asyncio.create_task(failing.wait_failed())
        core.fail_next_step = True
        with pytest.raises(EngineDeadError, match="simulated failure"):
            async for _ in failing.generate([5, 6, 7], SamplingParams(max_tokens=2)):
                pass
        error = await asyncio.wait_for(waiting, 5)
        assert "simulated failure" in str(error)
        await failing.stop()

    asyncio.run(scenario())
