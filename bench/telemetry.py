"""Sampling while a benchmark runs: GPU memory and utilisation, server RSS, server /metrics.

Sampling runs in its own process, off the asyncio loop whose latency the harness measures. NVML is
imported and initialised in one place (`nvml`), so a machine without a GPU or without the
library simply has no GPU samples.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import queues as mp_queues
from multiprocessing import resource_tracker
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from types import ModuleType, TracebackType

import psutil
from prometheus_client.parser import text_string_to_metric_families

from runtime.lifetime import bind_to_parent

log = logging.getLogger(__name__)

MEMORY_METRICS = ("memory_used_mib", "rss_mib")
# The server-side signals that tell an under-fed server from a saturated one (vLLM's names;
# the bundled engine uses them too). Servers without /metrics simply contribute nothing.
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # vLLM's name, then older
PREEMPTIONS = "vllm:num_preemptions_total"  # a counter: cumulative since the server started
SERVER_METRICS = (RUNNING, WAITING, *KV_USAGE, PREEMPTIONS)
_MIB = 1024 * 1024


@contextlib.contextmanager
def nvml() -> Iterator[ModuleType | None]:
    """The initialised pynvml module, or None where there is no NVIDIA driver or library."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError, or NVMLError of any kind: no usable GPU
        log.debug("no NVML: %s", exc)
        yield None
        return
    try:
        yield pynvml
    finally:
        pynvml.nvmlShutdown()


@dataclass(frozen=True)
class Sample:
    t_s: float  # time.perf_counter()
    source: str  # gpu0, gpu1, ..., process
    metric: str  # memory_used_mib, gpu_util_pct, rss_mib
    value: float


def _rss_mib(pid: int) -> float | None:
    """RSS of a process and all its descendants (a server may fork workers)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / _MIB


def peaks(samples: Sequence[Sample], since_s: float) -> dict[str, float]:
    """Peak of each memory metric from `since_s` on, keyed "source.metric" (gpu0.memory_used_mib).

    The value each metric had when the window opened (its last sample before it) counts too,
    so a window shorter than the sampling interval still has a peak.
    """
    result: dict[str, float] = {}
    for s in samples:  # in time order: an earlier opening value is overwritten by a later one
        if s.metric not in MEMORY_METRICS:
            continue
        key = f"{s.source}.{s.metric}"
        if s.t_s < since_s:
            result[key] = s.value
        else:
            result[key] = max(result.get(key, s.value), s.value)
    return result


def scrape_server(metrics_url: str, timeout_s: float = 0.5) -> list[Sample]:
    """The SERVER_METRICS a Prometheus endpoint exposes, summed over label sets."""
    now = time.perf_counter()
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout_s) as resp:
            text = resp.read().decode()
        families = list(text_string_to_metric_families(text))
    except (OSError, ValueError):
        return []
    totals: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            if sample.name in SERVER_METRICS:
                totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    return [Sample(now, "server", name, value) for name, value in totals.items()]


def _sample_forever(
    interval_s: float,
    pids: list[int],
    metrics_url: str | None,
    scrape_interval_s: float,
    out: mp_queues.Queue[list[Sample]],
    stop: EventType,
    parent_pid: int,
) -> None:
    bind_to_parent(parent_pid)  # stopped by `stop`, or gone with the harness; not by Ctrl-C
    next_scrape = 0.0
    with nvml() as nv:
        handles = [] if nv is None else [
            nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())
        ]  # fmt: skip
        while True:
            rows = _sample(nv, handles, pids)
            if metrics_url and time.perf_counter() >= next_scrape:
                rows += scrape_server(metrics_url)
                next_scrape = time.perf_counter() + scrape_interval_s
            out.put(rows)
            if stop.wait(interval_s):
                out.put(_sample(nv, handles, pids))  # the final state, so short runs are covered
                return


def _sample(nv: ModuleType | None, handles: list[object], pids: list[int]) -> list[Sample]:
    now = time.perf_counter()
    rows = []
    for i, h in enumerate(handles):
        assert nv is not None
        # A query a GPU does not support (utilisation on a MIG-enabled GPU) must not end the
        # sampling process: that would lose every later sample, the server's RSS included.
        with contextlib.suppress(nv.NVMLError):
            used = nv.nvmlDeviceGetMemoryInfo(h).used
            rows.append(Sample(now, f"gpu{i}", "memory_used_mib", used / _MIB))
        with contextlib.suppress(nv.NVMLError):
            util = nv.nvmlDeviceGetUtilizationRates(h).gpu
            rows.append(Sample(now, f"gpu{i}", "gpu_util_pct", float(util)))
    for pid in pids:
        rss = _rss_mib(pid)
        if rss is not None:
            rows.append(Sample(now, "process", "rss_mib", rss))
    return rows


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (the sampler's queue and process need one) with
    SIGHUP blocked for good. It ignores SIGINT and SIGTERM itself, but a terminal's hang-up
    reaches the whole foreground process group, and a tracker it kills is relaunched with no
    record of the sampler's semaphores: freeing them then prints a traceback each."""
    if not hasattr(signal, "pthread_sigmask") or not hasattr(signal, "SIGHUP"):
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:  # a blocked signal is inherited, and the tracker unblocks only SIGINT and SIGTERM
        resource_tracker.ensure_running()
    finally:  # a hang-up that came meanwhile is delivered now
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Sampler:
    """Samples in a separate process: walking the process table costs milliseconds of Python,
    which in a thread would hold the GIL against the event loop whose latency we measure."""

    def __init__(
        self,
        interval_s: float = 0.1,
        pids: Sequence[int] = (),
        metrics_url: str | None = None,
        scrape_interval_s: float = 0.5,
    ) -> None:
        self.interval_s, self.pids, self.metrics_url = interval_s, list(pids), metrics_url
        self.scrape_interval_s = scrape_interval_s
        self._ctx = multiprocessing.get_context("spawn")
        _start_resource_tracker()
        self._queue: mp_queues.Queue[list[Sample]] = self._ctx.Queue()
        self._stop = self._ctx.Event()
        self._process: BaseProcess | None = None
        self._samples: list[Sample] = []

    def start(self) -> Sampler:
        args = (
            self.interval_s, self.pids, self.metrics_url, self.scrape_interval_s,
            self._queue, self._stop, os.getpid(),
        )  # fmt: skip
        self._process = self._ctx.Process(target=_sample_forever, args=args, daemon=True)
        self._process.start()
        return self

    def stop(self) -> None:
        """Stop sampling (idempotent); the sampler takes one last sample first."""
        self._stop.set()
        if self._process is not None:
            self._drain(until_exit=self._process)
            self._process = None

    def _drain(self, until_exit: BaseProcess | None = None) -> None:
        while True:
            try:
                self._samples.extend(self._queue.get(timeout=0.05 if until_exit else 0))
            except queue.Empty:
                if until_exit is None or not until_exit.is_alive():
                    return

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.stop()

    def samples(self) -> list[Sample]:
        self._drain()
        return list(self._samples)

    def peaks_since(self, since_s: float) -> dict[str, float]:
        """Memory peaks since a time.perf_counter() instant (see `peaks`)."""
        return peaks(self.samples(), since_s)
