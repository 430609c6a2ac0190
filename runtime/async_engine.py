"""The engine behind an asyncio server: one engine thread steps the core, the loop only waits.

Threads and ownership:

- The engine thread owns the `EngineCore` and calls it exclusively; a model step can take tens
  of milliseconds, which on the event loop would stall every stream (a torch forward releases
  the GIL, so the loop keeps serving while the step runs).
- The event loop owns the request records (`_Request`) and their `RequestTimings`, which it
  writes alone. The two sides meet in exactly two places: the command queue (loop -> engine:
  add, abort) and one `call_soon_threadsafe` per engine iteration (engine -> loop: every output
  of that step), so the loop wakes once per step, not once per token.
- The engine thread sleeps on a `threading.Event` when the core has no work; every command
  sets it. The event is cleared *before* the commands are drained, so a command that arrives
  after the drain always finds it set: no lost wake-up, no busy loop.

Failure: if the engine thread raises, every in-flight request gets `EngineDeadError`, later
ones are refused at once and `healthy` turns false; nothing waits forever. `wait_failed` tells a
server that should exit rather than answer errors until someone restarts it (a dead
tensor-parallel rank never comes back).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from runtime.sequence import EngineStats, SamplingParams, TokenOutput

log = logging.getLogger(__name__)


class EngineCore(Protocol):
    """Synchronous engine: everything is called from the engine thread only."""

    max_model_len: int

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold: [0, vocab_size)."""
        ...

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Returns the seq_id; raises ValueError with a user-facing message if the request
        cannot be served (e.g. longer than max_model_len)."""
        ...

    def abort(self, seq_id: int) -> None: ...

    def has_work(self) -> bool: ...

    def step(self) -> list[TokenOutput]: ...

    def stats(self) -> EngineStats: ...

    def load_breakdown(self) -> dict[str, float]:
        """How loading went, seconds per phase (and sizes), for the harness to record."""
        ...

    def kernels(self) -> dict[str, str]:
        """What computes attention, linears, element-wise ops and graphs (model_runner.py)."""
        ...

    def close(self) -> None:
        """Release what the core holds beyond this process (tensor-parallel worker ranks);
        called once the engine thread has stopped."""
        ...


class QueueFull(Exception):
    """Admission refused: `max_waiting` requests already wait for a batch slot."""


class EngineDeadError(RuntimeError):
    """The engine thread failed or was stopped; no request can be served any more."""


@dataclass
class RequestTimings:
    """Server-side timestamps of one request, time.perf_counter() (CLOCK_MONOTONIC on Linux,
    the clock the harness reads too).

    `first_scheduled` is the start of the first engine step that reported on the request. A
    core that reports scheduled prefill chunks as outputs without tokens makes it exact;
    otherwise it is the step that sampled the first token, and earlier prefill chunks count as
    queueing. Token and finish times are the ends of the steps that produced them.
    """

    arrival: float
    first_scheduled: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per output that carried tokens
    finished: float | None = None  # the step of the last output the request used

    @property
    def first_token(self) -> float | None:
        return self.token_times[0] if self.token_times else None


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    timings: RequestTimings
    # Step outputs with that step's start and end, or the error that ends the request.
    outputs: asyncio.Queue[tuple[TokenOutput, float, float] | BaseException]
    seq_id: int | None = None  # written and read by the engine thread only


_Command = tuple[Literal["add", "abort"], _Request]
_Delivery = list[tuple[_Request, tuple[TokenOutput, float, float] | BaseException]]


class AsyncEngine:
    def __init__(self, core: EngineCore, max_waiting: int = 0) -> None:
        """`max_waiting`: requests allowed to wait beyond those running; 0 means unbounded."""
        self.core = core
        self.max_model_len = core.max_model_len
        self.vocab_size = core.vocab_size
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._requests: set[_Request] = set()  # in flight, loop side
        self._by_seq: dict[int, _Request] = {}  # in the core, engine-thread side
        self._error: EngineDeadError | None = None
        self._failed = asyncio.Event()  # the engine thread raised (not set by `stop`)
        self._stats = EngineStats(0, 0, 0.0, 0, 0, 0)  # replaced (never mutated) by the thread

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the outputs."""
        self._loop = asyncio.get_running_loop()
        # Daemon: a step stuck in native code must not keep the process alive at exit.
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the engine thread after its current step; in-flight requests get an error."""
        if self._thread is None:
            return
        self._stopping = True
        self._wakeup.set()
        await asyncio.to_thread(self._thread.join)
        await asyncio.to_thread(self.core.close)  # after the join: the thread owns the core
        self._fail(EngineDeadError("the engine was stopped"))

    async def wait_failed(self) -> EngineDeadError:
        """Return once the engine thread has failed, with the error every request got; a
        `stop` is no failure and never returns it."""
        await self._failed.wait()
        assert self._error is not None
        return self._error

    @property
    def healthy(self) -> bool:
        return self._error is None and self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        """The core's stats after the engine's latest iteration (at most one step old)."""
        return self._stats

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, timings: RequestTimings | None = None
    ) -> AsyncGenerator[TokenOutput, None]:
        """The request's outputs that carry tokens or finish it, in order; the last one has
        `finished` set. Stopping early (break, aclose, cancellation) aborts the request in the
        engine, which frees its KV blocks.

        Raises QueueFull or EngineDeadError before anything is submitted, ValueError if the
        core refuses the request, EngineDeadError if the engine fails while it runs. Pass
        `timings` to have them filled in (its `arrival` set by the caller, when the HTTP
        request arrived).
        """
        if self._error is not None:
            raise EngineDeadError(*self._error.args)
        waiting = len(self._requests) - self._stats.num_running
        if self.max_waiting and waiting >= self.max_waiting:
            raise QueueFull(
                f"{waiting} requests are already waiting for a batch slot (--max-waiting "
                f"{self.max_waiting}); retry later"
            )
        timings = timings or RequestTimings(time.perf_counter())
        request = _Request(list(prompt_ids), params, timings, asyncio.Queue())
        self._requests.add(request)
        self._submit("add", request)
        done = False
        try:
            while not done:
                item = await request.outputs.get()
                if isinstance(item, BaseException):
                    done = True  # the request never reached the core, or the core is gone
                    raise item
                out, step_start, step_end = item
                if timings.first_scheduled is None:
                    timings.first_scheduled = step_start
                if out.new_token_ids:
                    timings.token_times.append(step_end)
                done = out.finished
                if done:
                    timings.finished = step_end
                if out.new_token_ids or done:
                    yield out
        finally:
            self._requests.discard(request)
            if not done:
                self._submit("abort", request)
                if timings.token_times:
                    timings.finished = timings.token_times[-1]

    def _submit(self, kind: Literal["add", "abort"], request: _Request) -> None:
        self._commands.put((kind, request))
        self._wakeup.set()

    def _fail(self, error: EngineDeadError) -> None:
        """Loop side: end every in-flight request with `error`, refuse new ones."""
        self._error = self._error or error
        for request in self._requests:
            request.outputs.put_nowait(error)

    def _died(self, error: EngineDeadError) -> None:
        """Loop side: the engine thread failed with `error`."""
        self._fail(error)
        self._failed.set()

    @staticmethod
    def _deliver(delivery: _Delivery) -> None:
        for request, item in delivery:
            request.outputs.put_nowait(item)

    # --- engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        assert self._loop is not None
        try:
            while True:
                self._wakeup.clear()  # before draining: see the module docstring
                if self._stopping:
                    return
                delivery: _Delivery = []
                self._drain_commands(delivery)
                if self.core.has_work():
                    self._step(delivery)
                self._stats = self.core.stats()
                if delivery:
                    self._loop.call_soon_threadsafe(self._deliver, delivery)
                if not self.core.has_work():
                    self._wakeup.wait()
        except Exception as exc:
            log.exception("the engine thread failed; every in-flight request gets an error")
            error = EngineDeadError(f"the engine failed: {exc!r}")
            error.__cause__ = exc
            self._loop.call_soon_threadsafe(self._died, error)

    def _drain_commands(self, delivery: _Delivery) -> None:
        # One queue for both kinds keeps a request's abort behind its add.
        while True:
            try:
                kind, request = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    request.seq_id = self.core.add_request(request.prompt_ids, request.params)
                except ValueError as exc:
                    delivery.append((request, exc))
                    continue
                self._by_seq[request.seq_id] = request
            elif request.seq_id is not None and self._by_seq.pop(request.seq_id, None) is not None:
                self.core.abort(request.seq_id)

    def _step(self, delivery: _Delivery) -> None:
        start = time.perf_counter()
        outputs = self.core.step()
        end = time.perf_counter()
        for out in outputs:
            request = self._by_seq[out.seq_id]
            if out.finished:
                del self._by_seq[out.seq_id]
            delivery.append((request, (out, start, end)))
