"""client.backend=ray: workers as Ray actors on a local Ray bound to 127.0.0.1."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from bench import runner, store
from bench.compose import compose
from bench.refserver import read_truth_log
from tests.conftest import RefServer

ray = pytest.importorskip("ray", reason="Ray is the `cluster` extra (make test installs it)")
pytestmark = pytest.mark.slow


@pytest.fixture
def local_ray() -> Iterator[None]:
    """A local Ray as the harness starts one, held open so the test can inspect its traffic."""
    from bench.ray_workers import start_local_ray

    start_local_ray()
    yield
    ray.shutdown()


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket's
    return (mapped or address).is_loopback


def _ray_processes() -> list[psutil.Process]:
    mine = psutil.Process()
    return [mine, *mine.children(recursive=True)]


def test_two_ray_workers_record_every_request_once_on_the_coordinators_clock(
    tmp_path: Path, refserver: Callable[..., RefServer], local_ray: None
) -> None:
    srv = refserver("--ttft-ms", "20", "--itl-ms", "5")
    cfg = compose(
        "target=openai", f"target.base_url={srv.url}", "target.model=refserver",
        f"results_dir={tmp_path}", "progress=false", "scenario.repeats=1",
        "scenario.output_tokens=32", "scenario.warmup_requests=4",
        "client.workers=2", "client.backend=ray",
        "scenario.concurrency=16", "scenario.num_requests=64",
    )  # fmt: skip
    result = runner.run(cfg)
    assert result.status == "complete", result.reason
    # Ray's processes listened, and talked to each other and to the server, on loopback only.
    listening = {
        c.laddr.ip
        for p in _ray_processes()
        for c in p.net_connections("inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening and all(map(_loopback, listening)), listening
    peers = {
        c.raddr.ip
        for p in _ray_processes()
        for c in p.net_connections("inet")
        if c.raddr and c.status == psutil.CONN_ESTABLISHED
    }
    assert peers and all(map(_loopback, peers)), peers

    data = store.load(result.run_dir)
    reqs, (run,) = data.requests, data.runs.itertuples()
    truth = {t.request_id: t for t in read_truth_log(srv.truth_log)}
    assert len(reqs) == 64 and reqs["request_id"].is_unique
    assert set(reqs["request_id"]) <= set(truth)
    assert sorted(reqs["index"]) == list(range(64))
    assert reqs["ok"].all() and (reqs["output_tokens"] == 32).all()
    assert set(reqs["worker"]) == {0, 1} and run.workers == 2
    # One host, one monotonic clock: the measured offset is 0 within its stated uncertainty.
    for offset, uncertainty in zip(
        run.worker_clock_offset_ms, run.worker_clock_uncertainty_ms, strict=True
    ):
        assert 0.0 < uncertainty < 50.0
        assert abs(offset) <= uncertainty
    # The actors' times, shifted onto the coordinator's clock, agree with the server's.
    origin = run.monotonic_origin_s
    for r in reqs.itertuples():
        t = truth[r.request_id]
        assert origin + r.sent_s <= t.received + 0.001 + max(run.worker_clock_uncertainty_ms) / 1e3
    errors = sorted(r.ttft_ms - truth[r.request_id].ttft_s * 1e3 for r in reqs.itertuples())
    assert 0.0 < errors[len(errors) // 2] < 10.0
