"""Client workers: a load level split across processes, each with its own event loop, so that
the client's own delay does not set the latency it reports (client.workers, client.backend).

The coordinator (bench/runner.py) splits each level (`split`), hands every worker its part and
records the results as they arrive, into the run's one set of Parquet files. A worker runs its
part with the same load generator one process uses (bench/load.py), sends back each result as
it finishes, then its event-loop lag. Workers live for the whole run, so their imports and
connections are warm for every level.

Local workers are processes on this host (`LocalWorkers`), on the coordinator's monotonic
clock. Ray workers (bench/ray_workers.py) may run on other machines: each one's clock offset
is measured and applied to every time it reports (`Clock`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import math
import multiprocessing
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from bench import client
from bench.config import BenchConfig, LoadLevel, TargetConfig
from bench.load import LagMonitor, LevelOutcome, Part, run_conversations, run_level
from bench.workload import RequestSpec, Tokenizer, load_tokenizer
from runtime.lifetime import bind_to_parent

log = logging.getLogger(__name__)

# A result as a worker reports it: the spec's index in the level, whether it went during the
# ramp-up, and what came back.
Report = tuple[int, bool, client.RequestResult]
OnResult = Callable[[RequestSpec, client.RequestResult, int], None]


@dataclass(frozen=True)
class Setup:
    """What every worker needs to send requests, fixed for the run."""

    target: TargetConfig  # with the server's base_url and model resolved
    tokenizer: str | None  # a local tokenizer's path, for token attribution
    request_timeout_s: float
    max_streams: int | None  # the most connections one worker opens (None: no cap)


@dataclass(frozen=True)
class Job:
    """One worker's part of one level."""

    level: LoadLevel
    specs: list[RequestSpec]
    part: Part
    ramp_up_s: float
    think_time_s: float  # > 0 or not, conversations send each turn after the reply
    conversations: bool
    max_consecutive_connection_errors: int


@dataclass(frozen=True)
class Done:
    """A worker's end of a level, on its own clock."""

    ended_s: float
    stopped_early: str | None
    lag: list[tuple[float, float]]  # (time, seconds) event-loop lag samples


@dataclass(frozen=True)
class Clock:
    """A worker's clock against the coordinator's: worker time - coordinator time, and half the
    round trip of the exchange that measured it (the true offset lies within ±uncertainty)."""

    offset_s: float
    uncertainty_s: float

    def to_coordinator(self, t: float) -> float:
        return t - self.offset_s


SAME_CLOCK = Clock(0.0, 0.0)  # processes on one host read one CLOCK_MONOTONIC


def measure_clock(remote_now: Callable[[], float], rounds: int = 16) -> Clock:
    """The offset of a remote clock, as NTP measures it: of `rounds` exchanges, the one with
    the shortest round trip, whose reply was read at most half of it from the midpoint."""
    best: Clock | None = None
    for _ in range(rounds):
        t0 = time.perf_counter()
        remote = remote_now()
        t1 = time.perf_counter()
        clock = Clock(remote - (t0 + t1) / 2, (t1 - t0) / 2)
        if best is None or clock.uncertainty_s < best.uncertainty_s:
            best = clock
    assert best is not None
    return best


@dataclass(frozen=True)
class Share:
    """One worker's share of a level: its part (which users, or its cap) and its requests."""

    part: Part
    specs: list[RequestSpec]


def split(level: LoadLevel, specs: list[RequestSpec], n: int, conversations: bool) -> list[Share]:
    """The level's requests and users as up to n parts, in the same schedule one process keeps.

    Closed loop: user k goes to worker k mod n, and request i (a conversation, with its turns)
    to the worker of user i mod users, so each worker's share of requests follows its share of
    users. Open loop: arrival i goes to worker i mod n with its own send time, and a cap on
    requests in flight is divided among the workers. Workers left without users get no part.
    """
    if level.request_rate is not None:
        caps = _divide(level.concurrency, n) if level.concurrency else [None] * n
        parts = [(Part((), caps[w]), specs[w::n]) for w in range(n)]
    else:
        users = level.concurrency or 1
        units = _conversations(specs) if conversations else [[s] for s in specs]
        parts = [
            (
                Part(tuple(range(w, users, n)), None),
                [s for i, unit in enumerate(units) if (i % users) % n == w for s in unit],
            )
            for w in range(min(n, users))
        ]
    return [Share(part, share) for part, share in parts if share]


def _divide(total: int, n: int) -> list[int | None]:
    return [max(1, total // n + (w < total % n)) for w in range(n)]


def _conversations(specs: list[RequestSpec]) -> list[list[RequestSpec]]:
    return [list(turns) for _, turns in itertools.groupby(specs, lambda s: s.group_id)]


class LevelRunner:
    """A worker's side: runs the parts of levels it is handed on its own event loop."""

    def __init__(self, setup: Setup, tokenizer: Tokenizer | None) -> None:
        self.setup, self.tokenizer = setup, tokenizer
        self.session: aiohttp.ClientSession | None = None

    async def run(self, job: Job, report: Callable[[Report], None]) -> Done:
        if self.session is None:  # created on the loop that uses it
            self.session = client.session(self.setup.max_streams, self.setup.request_timeout_s)
        session, target = self.session, self.setup.target
        assert target.model is not None

        async def send(spec: RequestSpec, at: float) -> client.RequestResult:
            return await client.send(session, target, str(target.model), spec, at, self.tokenizer)

        def keep(spec: RequestSpec, result: client.RequestResult) -> None:
            # The reply's text only feeds the conversation's next turn, sent from here.
            report((spec.index, spec.ramp_up, dataclasses.replace(result, text="")))

        lag = LagMonitor()
        lag_task = asyncio.create_task(lag.run())
        limit = job.max_consecutive_connection_errors
        try:
            if job.conversations:
                outcome = await run_conversations(
                    send, job.specs, job.level, job.think_time_s, keep, limit,
                    ramp_up_s=job.ramp_up_s, part=job.part,
                )  # fmt: skip
            else:
                outcome = await run_level(
                    send, job.specs, job.level, keep, limit, ramp_up_s=job.ramp_up_s, part=job.part
                )
        finally:
            lag_task.cancel()
        return Done(outcome.ended_s, outcome.stopped_early, lag.samples)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


@dataclass
class WorkerLevel:
    """What one worker measured of a level, on the coordinator's clock."""

    worker: int
    clock: Clock
    done: Done | None = None
    lost: str | None = None  # why the worker stopped answering mid-level

    @property
    def lag(self) -> list[tuple[float, float]]:
        if self.done is None:
            return []
        return [(self.clock.to_coordinator(t), s) for t, s in self.done.lag]


class Workers(Protocol):
    """The run's running workers: the coordinator's own loop, local processes or Ray actors."""

    clocks: list[Clock]
    start_ahead_s: float  # how far ahead a level starts, for every worker to have its part

    def sync_clocks(self) -> None:
        """Measure the workers' clock offsets again (clocks drift), before a level."""

    async def run(
        self, jobs: Sequence[Job], on_report: Callable[[int, Report], None]
    ) -> list[WorkerLevel]: ...

    async def close(self) -> None: ...


class InProcess:
    """client.workers=1: the one worker is the coordinator's own event loop."""

    start_ahead_s = 0.0

    def __init__(self, setup: Setup, tokenizer: Tokenizer | None) -> None:
        self.runner = LevelRunner(setup, tokenizer)
        self.clocks = [SAME_CLOCK]

    def sync_clocks(self) -> None:
        pass  # the coordinator's own clock

    async def run(
        self, jobs: Sequence[Job], on_report: Callable[[int, Report], None]
    ) -> list[WorkerLevel]:
        (job,) = jobs
        done = await self.runner.run(job, lambda report: on_report(0, report))
        return [WorkerLevel(0, SAME_CLOCK, done)]

    async def close(self) -> None:
        await self.runner.close()


def to_coordinator(result: client.RequestResult, clock: Clock) -> client.RequestResult:
    """A worker's result with its times on the coordinator's clock."""
    if clock == SAME_CLOCK:
        return result
    shift = clock.to_coordinator
    return dataclasses.replace(
        result,
        scheduled_s=shift(result.scheduled_s),
        sent_s=shift(result.sent_s),
        end_s=shift(result.end_s),
        event_s=[shift(t) for t in result.event_s],
        first_output_s=None if result.first_output_s is None else shift(result.first_output_s),
    )


async def run_level_on(
    workers: Workers,
    specs: list[RequestSpec],
    level: LoadLevel,
    on_result: OnResult,
    *,
    conversations: bool,
    ramp_up_s: float,
    think_time_s: float,
    max_consecutive_connection_errors: int,
) -> tuple[LevelOutcome, list[WorkerLevel]]:
    """Run one level on the workers; every result goes to on_result(spec, result, worker) as it
    arrives, on the coordinator's clock. The level starts for all workers at one instant, a
    little ahead, so each has its part in hand before its first send time."""
    n = len(workers.clocks)
    workers.sync_clocks()
    started_s = time.perf_counter() + workers.start_ahead_s
    jobs = [
        Job(
            level=level,
            specs=share.specs,
            part=dataclasses.replace(share.part, started_s=workers.clocks[w].offset_s + started_s),
            ramp_up_s=ramp_up_s,
            think_time_s=think_time_s,
            conversations=conversations,
            max_consecutive_connection_errors=max_consecutive_connection_errors,
        )
        for w, share in enumerate(split(level, specs, n, conversations))
    ]
    by_index = {s.index: s for s in specs}
    outcome = LevelOutcome(started_s=started_s)

    def on_report(worker: int, report: Report) -> None:
        index, ramp_up, result = report
        result = to_coordinator(result, workers.clocks[worker])
        outcome.results.append(result)
        on_result(dataclasses.replace(by_index[index], ramp_up=ramp_up), result, worker)

    ends = await workers.run(jobs, on_report)
    outcome.ended_s = max(
        (e.clock.to_coordinator(e.done.ended_s) for e in ends if e.done), default=started_s
    )
    reasons = [e.lost for e in ends if e.lost] + [
        e.done.stopped_early for e in ends if e.done and e.done.stopped_early
    ]
    # Every request of a level is sent unless it stopped early, but a conversation's turns
    # after a failed one.
    missing = len(specs) - len(outcome.results)
    if not reasons and missing and not conversations:
        reasons.append(f"the workers reported {len(outcome.results)} of {len(specs)} requests")
    outcome.stopped_early = reasons[0] if reasons else None
    return outcome, ends


def auto_workers(cfg: BenchConfig, server_on_this_host: bool) -> int:
    """client.workers=auto: enough workers for the heaviest level, at client.streams_per_worker
    streams (closed loop) or client.tokens_per_s_per_worker output tokens/s (open loop) each,
    within this host's cores less the server's when it runs here."""
    cl, sc = cfg.client, cfg.scenario
    need = 1
    for level in sc.levels():
        if level.request_rate is None:
            streams = level.concurrency or 1
            if sc.search == "concurrency":
                streams = int(cfg.capacity.max_load)
            need = max(need, math.ceil(streams / cl.streams_per_worker))
        else:
            rate = cfg.capacity.max_load if sc.search == "rate" else level.request_rate
            tokens_per_s = rate * level.output_tokens
            need = max(need, math.ceil(tokens_per_s / cl.tokens_per_s_per_worker))
    cores = len(os.sched_getaffinity(0))
    # A server on this host keeps half the cores: its speed is what is measured.
    free = cores - (cores + 1) // 2 if server_on_this_host else cores
    return max(1, min(need, free))


def on_this_host(base_url: str) -> bool:
    host = urlsplit(base_url).hostname or ""
    return host in {"localhost", "::1"} or host.startswith("127.")


# --- local worker processes ------------------------------------------------------------------


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # optional: a faster loop leaves more of the core to the streams

        return uvloop.new_event_loop()  # type: ignore[no-any-return]
    except ImportError:
        return asyncio.new_event_loop()


def _process_main(conn: Connection, setup: Setup, cpu: int | None, parent: int) -> None:
    """A local worker process: runs each Job it receives and reports back, until None."""
    # A terminal's Ctrl-C and hang-up reach every process of its group: the coordinator stops
    # the run, and a worker ends with it, even one the coordinator's SIGKILL left mid-level.
    bind_to_parent(parent)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    loop = _event_loop()
    runner = LevelRunner(setup, load_tokenizer(setup.tokenizer))

    async def serve() -> None:
        while (job := await loop.run_in_executor(None, conn.recv)) is not None:
            done = await runner.run(job, lambda r: conn.send(("result", r)))
            conn.send(("done", done))
        await runner.close()

    conn.send(("ready", None))
    try:
        loop.run_until_complete(serve())
    finally:
        loop.close()


class LocalWorkers:
    """N worker processes on this host, optionally each pinned to one CPU (client.pin_workers:
    worker k to the k-th of the last N CPUs this process may use, leaving the first ones to a
    local server; with one worker, the coordinator itself to the last)."""

    # Enough for each worker to receive a part of thousands of requests before the level starts.
    start_ahead_s = 0.2

    def __init__(self, setup: Setup, n: int, pin: bool) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads
        allowed = sorted(os.sched_getaffinity(0))
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for w in range(n):
            ours, theirs = ctx.Pipe()
            cpu = allowed[-n:][w] if pin and n <= len(allowed) else None
            proc = ctx.Process(
                target=_process_main,
                args=(theirs, setup, cpu, os.getpid()),
                name=f"bench-worker-{w}",
            )
            proc.daemon = True  # never outlives the coordinator
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)
        self.clocks = [SAME_CLOCK] * n  # one host, one monotonic clock
        self.busy: set[int] = set()
        # A thread per worker waits on its pipe. The default executor has fewer threads than
        # workers on a small machine, and a worker no thread reads would block on a full pipe.
        self.readers = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="worker-pipe")
        for w, conn in enumerate(self.conns):
            message = self._recv(w, conn, timeout_s=120.0)
            if message is None or message[0] != "ready":
                self._stop()
                raise RuntimeError(f"client worker {w} did not start: {self._lost(w)}")

    def sync_clocks(self) -> None:
        pass

    def _lost(self, w: int) -> str:
        self.procs[w].join(timeout=1.0)
        return f"client worker {w} exited with code {self.procs[w].exitcode}"

    @staticmethod
    def _recv(w: int, conn: Connection, timeout_s: float) -> tuple[str, Any] | None:
        if not conn.poll(timeout_s):
            return None
        try:
            message: tuple[str, Any] = conn.recv()
        except (EOFError, OSError):
            return None
        return message

    async def run(
        self, jobs: Sequence[Job], on_report: Callable[[int, Report], None]
    ) -> list[WorkerLevel]:
        loop = asyncio.get_running_loop()
        ends = [WorkerLevel(w, SAME_CLOCK) for w in range(len(jobs))]

        async def one(w: int, job: Job) -> None:
            conn = self.conns[w]
            conn.send(job)
            self.busy.add(w)
            while True:
                message = await loop.run_in_executor(self.readers, self._recv, w, conn, 3600.0)
                if message is None:
                    ends[w].lost = self._lost(w)
                    return
                kind, body = message
                if kind == "done":
                    ends[w].done = body
                    self.busy.discard(w)
                    return
                on_report(w, body)

        await asyncio.gather(*(one(w, job) for w, job in enumerate(jobs)))
        return ends

    async def close(self) -> None:
        self._stop()

    def _stop(self) -> None:
        for w, (conn, proc) in enumerate(zip(self.conns, self.procs, strict=True)):
            if w in self.busy:  # mid-level (a stop signal): its level is already abandoned
                proc.terminate()
            with contextlib.suppress(OSError):
                conn.send(None)
        deadline = time.monotonic() + 5.0
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.readers.shutdown(wait=False)


@contextlib.asynccontextmanager
async def started(
    cfg: BenchConfig, setup: Setup, tokenizer: Tokenizer | None
) -> AsyncIterator[Workers]:
    """The run's workers (client.workers, client.backend), stopped when it ends."""
    cl = cfg.client
    n = cl.workers or auto_workers(cfg, on_this_host(str(setup.target.base_url)))
    workers: Workers
    if cl.backend == "ray":
        from bench.ray_workers import RayWorkers  # Ray is an optional extra

        workers = RayWorkers(setup, n, cl.ray_address)
    elif n == 1:
        workers = InProcess(setup, tokenizer)
    else:
        workers = LocalWorkers(setup, n, cl.pin_workers)
    if cl.workers is None:
        log.info("client.workers=auto: %d worker%s", n, "" if n == 1 else "s")
    cpus = os.sched_getaffinity(0)
    if cl.pin_workers and isinstance(workers, InProcess):  # the one worker is this process
        os.sched_setaffinity(0, {max(cpus)})
    try:
        yield workers
    finally:
        os.sched_setaffinity(0, cpus)
        await workers.close()
