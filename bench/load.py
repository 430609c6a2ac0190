"""Load generation: closed loop (N users) and open loop (scheduled arrivals), plus loop lag.

Open loop schedules every request against absolute times from the level's start and records
the intended time with the request, so latency can be measured from when the request *should*
have gone: a client that falls behind cannot hide queueing (coordinated omission).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench.client import RequestResult
from bench.config import LoadLevel
from bench.workload import RequestSpec

Send = Callable[[RequestSpec, float], Awaitable[RequestResult]]
# asyncio rounds timer waits up to whole milliseconds (epoll's resolution), and a process that
# sleeps may be woken late; sleeping until this close to a send time and then yielding until it
# arrives keeps the process awake for the deadline.
_SPIN_S = 0.004
# Each open-loop request's task is started this early and waits out its own send time, so no
# task-creation hop (a full pass of the event loop) lies between the deadline and the send.
_LEAD_S = 0.005


class LagMonitor:
    """Measures how long a ready callback waits for the event loop (the client's own delay).

    Every `interval_s` it yields once and times how long until it runs again: that is the
    backlog of callbacks ahead of it, i.e. how late this process would notice arriving bytes.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []  # (perf_counter, lag seconds)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            start = time.perf_counter()
            await asyncio.sleep(0)
            now = time.perf_counter()
            self.samples.append((now, now - start))


@dataclass
class LevelOutcome:
    results: list[RequestResult] = field(default_factory=list)
    started_s: float = 0.0
    ended_s: float = 0.0
    stopped_early: str | None = None  # why sending stopped before the last request


class _Abort:
    """Stops a level once the server looks gone (consecutive connection failures)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.streak = limit, 0
        self.reason: str | None = None

    def observe(self, result: RequestResult) -> None:
        self.streak = self.streak + 1 if result.error == "connection" else 0
        if self.streak >= self.limit and self.reason is None:
            self.reason = (
                f"{self.streak} consecutive connection failures ({result.error_message}); "
                "the server is unreachable"
            )


async def _until(t: float) -> float:
    """Wait until perf_counter() reaches t; returns the time actually reached."""
    delay = t - time.perf_counter()
    if delay > _SPIN_S:
        await asyncio.sleep(delay - _SPIN_S)
    while time.perf_counter() < t:
        await asyncio.sleep(0)
    return time.perf_counter()


async def run_level(
    send: Send,
    specs: list[RequestSpec],
    level: LoadLevel,
    on_result: Callable[[RequestSpec, RequestResult], None],
    max_consecutive_connection_errors: int,
) -> LevelOutcome:
    """Send `specs` at the level's load; every result, failed or not, goes to on_result."""
    out = LevelOutcome(started_s=time.perf_counter())
    abort = _Abort(max_consecutive_connection_errors)

    async def one(spec: RequestSpec, scheduled_s: float) -> None:
        result = await send(spec, scheduled_s)
        out.results.append(result)
        abort.observe(result)
        on_result(spec, result)

    if level.request_rate is None:
        pending = iter(specs)

        async def user() -> None:
            for spec in pending:  # a shared iterator: each spec goes to exactly one user
                if abort.reason:
                    return
                await one(spec, time.perf_counter())

        await asyncio.gather(*(user() for _ in range(level.concurrency or 1)))
    else:
        cap = asyncio.Semaphore(level.concurrency) if level.concurrency else None

        async def scheduled(spec: RequestSpec, scheduled_s: float) -> None:
            await _until(scheduled_s)
            if cap is None:
                await one(spec, scheduled_s)
                return
            async with cap:  # waiting here is send lag, and counts against latency
                await one(spec, scheduled_s)

        tasks = []
        for spec in specs:
            if abort.reason:
                break
            scheduled_s = out.started_s + spec.offset_s
            await asyncio.sleep(max(0.0, scheduled_s - _LEAD_S - time.perf_counter()))
            tasks.append(asyncio.create_task(scheduled(spec, scheduled_s)))
        await asyncio.gather(*tasks)
    out.ended_s = time.perf_counter()
    out.stopped_early = abort.reason
    return out
