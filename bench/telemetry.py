"""Resource sampling while a benchmark runs: GPU memory and utilisation, server RSS.

Sampling runs in a thread, not on the asyncio loop whose latency the harness measures. NVML is
imported and initialised in one place (`nvml`), so a machine without a GPU or without the
library simply has no GPU samples.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType, TracebackType

import psutil

log = logging.getLogger(__name__)

MEMORY_METRICS = ("memory_used_mib", "rss_mib")
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


class Sampler:
    def __init__(self, interval_s: float = 0.1, pids: Sequence[int] = ()) -> None:
        self.interval_s, self.pids = interval_s, list(pids)
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        with nvml() as nv:
            handles = [] if nv is None else [
                nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())
            ]  # fmt: skip
            while True:
                self._sample(nv, handles)
                if self._stop.wait(self.interval_s):
                    self._sample(nv, handles)  # the final state, so short windows are covered
                    return

    def _sample(self, nv: ModuleType | None, handles: list[object]) -> None:
        now = time.perf_counter()
        rows = []
        for i, h in enumerate(handles):
            assert nv is not None
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            util = nv.nvmlDeviceGetUtilizationRates(h)
            rows += [
                Sample(now, f"gpu{i}", "memory_used_mib", mem.used / _MIB),
                Sample(now, f"gpu{i}", "gpu_util_pct", float(util.gpu)),
            ]
        for pid in self.pids:
            rss = _rss_mib(pid)
            if rss is not None:
                rows.append(Sample(now, "process", "rss_mib", rss))
        with self._lock:
            self._samples.extend(rows)

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._loop, name="telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (idempotent); takes one last sample first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Sampler:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.stop()

    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    def mark(self) -> int:
        """A position in the sample stream, for peaks_since."""
        with self._lock:
            return len(self._samples)

    def peaks_since(self, mark: int) -> dict[str, float]:
        """Peak of each memory metric since `mark`, keyed "source.metric" (gpu0.memory_used_mib).

        The value each metric had when the window opened (its last sample before the mark)
        counts too, so a window shorter than the sampling interval still has a peak.
        """
        with self._lock:
            before, window = self._samples[max(mark - 64, 0) : mark], self._samples[mark:]
        peaks: dict[str, float] = {}
        opening: dict[str, float] = {}
        for s in before:
            opening[f"{s.source}.{s.metric}"] = s.value  # later samples overwrite earlier ones
        for s in window:
            key = f"{s.source}.{s.metric}"
            peaks[key] = max(peaks.get(key, opening.get(key, 0.0)), s.value)
        for key, value in opening.items():
            peaks.setdefault(key, value)
        return {k: v for k, v in peaks.items() if k.split(".")[1] in MEMORY_METRICS}
