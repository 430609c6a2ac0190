"""Client workers as Ray actors (client.backend=ray): on any node of a Ray cluster
(client.ray_address), or of a local Ray the run starts for itself, bound to 127.0.0.1.

Each actor runs its parts of levels with the same LevelRunner as a local worker process. The
coordinator measures each actor's clock offset before every level (round trips, as NTP
does), starts every part at one instant of the coordinator's clock, and collects finished
results every `_POLL_S` while the level runs, so a level that dies keeps what finished.
Every node needs this harness installed, at the same version as the coordinator.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray

from bench.workers import Clock, Done, Job, LevelRunner, Report, Setup, WorkerLevel, measure_clock
from bench.workload import load_tokenizer

log = logging.getLogger(__name__)
_POLL_S = 0.1


@ray.remote(num_cpus=1)
class _Actor:
    def __init__(self, setup: Setup) -> None:
        self.runner = LevelRunner(setup, load_tokenizer(setup.tokenizer))
        self.reports: list[Report] = []
        self.done: Done | None = None
        self.error: str | None = None
        self.task: asyncio.Task[None] | None = None

    async def now(self) -> float:
        return time.perf_counter()

    async def start(self, job: Job) -> None:
        self.reports, self.done, self.error = [], None, None
        self.task = asyncio.create_task(self._run(job))

    async def _run(self, job: Job) -> None:
        try:
            # Not self.reports.append: drain() swaps the list for a new one.
            self.done = await self.runner.run(job, lambda report: self.reports.append(report))
        except Exception as exc:  # reported to the coordinator, which marks the level partial
            self.error = f"{type(exc).__name__}: {exc}"

    async def drain(self) -> tuple[list[Report], Done | None, str | None]:
        reports, self.reports = self.reports, []
        return reports, self.done, self.error

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.runner.close()


def start_local_ray() -> None:
    """A local Ray of the run's own, every one of its servers bound to 127.0.0.1.

    Ray turns a node address of 127.0.0.1 into the machine's outward address, where some of
    its agents then listen and connect, unless clusters are switched off, as Ray does itself on
    macOS and Windows: then every process binds and dials loopback only.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # inherited by Ray's processes
    # and, in this process, read when Ray was imported: the driver resolves the node address.
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )


def _now_of(actor: Any) -> Callable[[], float]:
    return lambda: float(ray.get(actor.now.remote()))


class RayWorkers:
    """N actors spread over the cluster's nodes, each with its measured clock offset."""

    # A part crosses Ray's object store before the level starts.
    start_ahead_s = 0.5

    def __init__(self, setup: Setup, n: int, address: str | None) -> None:
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            if address is None:
                start_local_ray()
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        self.actors: list[Any] = [
            _Actor.options(scheduling_strategy="SPREAD").remote(setup)  # type: ignore[attr-defined]
            for _ in range(n)
        ]
        self.clocks: list[Clock] = []
        self.sync_clocks()
        for w, clock in enumerate(self.clocks):
            log.info(
                "Ray worker %d: clock offset %+.3f ms ± %.3f ms",
                w,
                clock.offset_s * 1e3,
                clock.uncertainty_s * 1e3,
            )

    def sync_clocks(self) -> None:
        # Before every level: unsynchronised clocks drift apart by parts per million, a
        # millisecond a minute at 20 ppm. 16 round trips per actor take a few milliseconds.
        self.clocks = [measure_clock(_now_of(actor)) for actor in self.actors]

    async def run(
        self, jobs: Sequence[Job], on_report: Callable[[int, Report], None]
    ) -> list[WorkerLevel]:
        ends = [WorkerLevel(w, self.clocks[w]) for w in range(len(jobs))]

        async def one(w: int, job: Job) -> None:
            actor = self.actors[w]
            try:
                await actor.start.remote(job)
                while True:
                    reports, done, error = await actor.drain.remote()
                    for report in reports:
                        on_report(w, report)
                    if error is not None:
                        ends[w].lost = f"Ray worker {w} failed: {error}"
                        return
                    if done is not None:
                        ends[w].done = done
                        return
                    await asyncio.sleep(_POLL_S)
            except ray.exceptions.RayActorError as exc:
                ends[w].lost = f"Ray worker {w} died: {exc}"

        try:
            await asyncio.gather(*(one(w, job) for w, job in enumerate(jobs)))
        except asyncio.CancelledError:  # a stop signal: the actors stop sending too
            for actor in self.actors:
                actor.stop.remote()
            raise
        return ends

    async def close(self) -> None:
        for actor in self.actors:
            try:
                ray.get(actor.stop.remote(), timeout=10)
            except (ray.exceptions.RayError, TimeoutError) as exc:
                log.debug("Ray worker did not stop cleanly: %s", exc)
            ray.kill(actor)
        if self.owns_ray:
            ray.shutdown()
