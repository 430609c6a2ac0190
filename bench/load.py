"""Load generation: closed loop (N users), open loop (scheduled arrivals) and conversations
(N users, each holding a conversation for its turns), plus loop lag.

Open loop schedules every request against absolute times from the level's start and records
the intended time with the request, so latency can be measured from when the request *should*
have gone: a client that falls behind cannot hide queueing (coordinated omission).

Ramp-up (scenario.ramp_up_s = R): closed-loop users and conversations' users start evenly
staggered over R, user k at k R / N; open-loop arrival times already rise over R (the workload's
offsets). Either way a request whose intended send time falls within R of the level's start is
marked `ramp_up`, and the level's statistics leave it out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench.client import RequestResult
from bench.config import LoadLevel
from bench.workload import Exchange, RequestSpec

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


@dataclass(frozen=True)
class Part:
    """The share of a level that one client process runs; with one process, all of it."""

    users: tuple[int, ...]  # closed loop and conversations: which of the level's users
    cap: int | None  # open loop: the most requests it keeps in flight (None: no cap)
    started_s: float | None = None  # the level's start on this process's clock; None: now

    @classmethod
    def whole(cls, level: LoadLevel) -> Part:
        return cls(tuple(range(level.concurrency or 1)), level.concurrency)


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


class _Sender:
    """Sends one request of a level: marks it ramp-up by its intended send time, keeps its
    result, watches for a server gone, and hands both to on_result."""

    def __init__(
        self,
        send: Send,
        on_result: Callable[[RequestSpec, RequestResult], None],
        max_consecutive_connection_errors: int,
        ramp_up_s: float,
        started_s: float | None,
    ) -> None:
        start = time.perf_counter() if started_s is None else started_s
        self.out = LevelOutcome(started_s=start)
        self.abort = _Abort(max_consecutive_connection_errors)
        self.send, self.on_result, self.ramp_up_s = send, on_result, ramp_up_s

    def user_start(self, user: int, level: LoadLevel) -> float:
        """When closed-loop user `user` of the level's starts: evenly staggered over the ramp."""
        return self.out.started_s + user * self.ramp_up_s / (level.concurrency or 1)

    async def one(self, spec: RequestSpec, scheduled_s: float) -> RequestResult:
        if scheduled_s - self.out.started_s < self.ramp_up_s:
            spec = dataclasses.replace(spec, ramp_up=True)
        result = await self.send(spec, scheduled_s)
        self.out.results.append(result)
        self.abort.observe(result)
        self.on_result(spec, result)
        return result

    def done(self) -> LevelOutcome:
        self.out.ended_s = time.perf_counter()
        self.out.stopped_early = self.abort.reason
        return self.out


async def run_level(
    send: Send,
    specs: list[RequestSpec],
    level: LoadLevel,
    on_result: Callable[[RequestSpec, RequestResult], None],
    max_consecutive_connection_errors: int,
    *,
    ramp_up_s: float = 0.0,
    part: Part | None = None,
) -> LevelOutcome:
    """Send `specs` at the level's load (this process's `part` of it, by default the whole);
    every result, failed or not, goes to on_result."""
    part = part or Part.whole(level)
    sender = _Sender(send, on_result, max_consecutive_connection_errors, ramp_up_s, part.started_s)
    out, abort, one = sender.out, sender.abort, sender.one

    if level.request_rate is None:
        pending = iter(specs)

        async def user(k: int) -> None:
            await _until(sender.user_start(k, level))
            for spec in pending:  # a shared iterator: each spec goes to exactly one user
                if abort.reason:
                    return
                await one(spec, time.perf_counter())

        await asyncio.gather(*(user(k) for k in part.users))
    else:
        cap = asyncio.Semaphore(part.cap) if part.cap else None

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
    return sender.done()


async def run_conversations(
    send: Send,
    specs: list[RequestSpec],
    level: LoadLevel,
    think_time_s: float,
    on_result: Callable[[RequestSpec, RequestResult], None],
    max_consecutive_connection_errors: int,
    *,
    ramp_up_s: float = 0.0,
    part: Part | None = None,
) -> LevelOutcome:
    """Closed loop over conversations: `specs` are their turns, consecutive by group_id and in
    turn order (bench/workload.py). Each of the level's users takes the next conversation and
    sends its turns one after another, each with every earlier turn's user message and the
    server's actual reply before its own, `think_time_s` after the previous reply's last byte.
    A failed turn ends its conversation, whose later turns would build on a reply that never
    came: they are not sent (the level's `sent` counts what was)."""
    part = part or Part.whole(level)
    sender = _Sender(send, on_result, max_consecutive_connection_errors, ramp_up_s, part.started_s)
    abort = sender.abort
    conversations = iter([list(g) for _, g in itertools.groupby(specs, lambda s: s.group_id)])

    async def user(k: int) -> None:
        await _until(sender.user_start(k, level))
        for turns in conversations:  # shared: each conversation goes to exactly one user
            history: tuple[Exchange, ...] = ()
            due = time.perf_counter()
            for spec in turns:
                if abort.reason:
                    return
                # The turn is due a think time after the reply: a late timer shows as send lag.
                await _until(due)
                result = await sender.one(dataclasses.replace(spec, history=history), due)
                if not result.ok:
                    break
                history = (*history, Exchange(spec.prompt, result.text))
                due = result.end_s + think_time_s

    await asyncio.gather(*(user(k) for k in part.users))
    return sender.done()
