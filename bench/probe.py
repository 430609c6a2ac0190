"""The machine's speed now: about a second of fixed work, run before and after each session.

A shared machine changes speed between sessions (host CPU steal, other tenants, frequency), by
20-30% between days on a shared VM. Two sessions of one build then differ by that much, and
a comparison would credit the build with it. The probe times the same work in each session so
that `bench.compare` can show how the machine itself changed and give no verdict on a change
it cannot tell from that (bench/compare.py).

What it times, each figure the best of a few repetitions (the least disturbed):

- CPU: a float32 matmul (numpy, MATMUL_N², all the BLAS threads) in GFLOP/s, and a memory copy
  of COPY_BYTES, larger than any common last-level cache, in GB/s (read + write, as STREAM
  counts a copy);
- client: the asyncio event loop's wake-up latency, the median µs of a `call_soon` round trip
  (a callback resolves a future the awaiting task then resumes on), the path every response
  byte of the client takes;
- GPU, only where NVML reports a GPU and torch with CUDA is installed: a bf16 GEMM in TFLOP/s
  and a device-to-device copy in GB/s. It runs in a child process: torch's import and CUDA's
  start take seconds, and a CUDA context left in the harness would hold GPU memory the server
  needs.

Cost on a 2-vCPU VM: about 0.4 s without a GPU, 0.6 s on a shared one (docs/perf.md); the GPU
part adds the child's torch import and CUDA start, a few seconds.

    python -m bench.probe         # prints one probe as JSON
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import logging
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from bench.telemetry import nvml

log = logging.getLogger(__name__)

MATMUL_N = 1024  # 2 GFLOP a product: 10-50 ms on one to a few cores
MATMUL_REPEATS = 5
COPY_BYTES = 256 * 2**20  # beyond the last-level cache of common CPUs (up to a few hundred MiB)
COPY_REPEATS = 5
LOOP_ROUNDS = 20_000  # call_soon round trips; ~5-20 µs each
GPU_TIMEOUT_S = 120.0  # the child's torch import, CUDA start and the work


@dataclass(frozen=True)
class Figure:
    """One figure of a probe, as reports name it."""

    field: str  # the Probe field
    label: str
    unit: str
    higher_is_better: bool
    part: str  # what it measures: "CPU", "client" or "GPU"


FIGURES = (
    Figure("cpu_matmul_gflops", "CPU matmul", "GFLOP/s", True, "CPU"),
    Figure("cpu_copy_gbs", "CPU copy", "GB/s", True, "CPU"),
    Figure("loop_wakeup_us", "loop wake-up", "µs", False, "client"),
    Figure("gpu_gemm_tflops", "GPU GEMM", "TFLOP/s", True, "GPU"),
    Figure("gpu_copy_gbs", "GPU copy", "GB/s", True, "GPU"),
)


@dataclass(frozen=True)
class Probe:
    """The machine's speed at one moment (see the module docstring for each figure)."""

    taken_at: str  # ISO 8601, UTC
    wall_s: float  # what taking the probe cost
    cpu_matmul_gflops: float
    cpu_copy_gbs: float
    loop_wakeup_us: float
    gpu_gemm_tflops: float | None = None  # None: no GPU, or no torch with CUDA
    gpu_copy_gbs: float | None = None

    def value(self, figure: Figure) -> float | None:
        value: float | None = getattr(self, figure.field)
        return value

    def speed(self, figure: Figure) -> float | None:
        """The figure as a speed (higher is faster): a latency's inverse."""
        v = self.value(figure)
        if v is None or not v > 0:
            return None
        return v if figure.higher_is_better else 1.0 / v

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Probe:
        """A probe as `to_json` wrote it; keys this version does not know are ignored."""
        data: dict[str, Any] = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary(self) -> str:
        """One line for logs: "CPU matmul 61.2 GFLOP/s, CPU copy 9.8 GB/s, ..."."""
        parts = [f"{f.label} {v:.3g} {f.unit}" for f in FIGURES if (v := self.value(f)) is not None]
        return ", ".join(parts) + f" (probe took {self.wall_s:.2f} s)"


@dataclass(frozen=True)
class Session:
    """The probes of one session (one `python -m bench` invocation, a run directory)."""

    before: Probe | None  # None: recorded by a harness without the probe
    after: Probe | None  # None: also when a signal stopped the session

    @property
    def probes(self) -> list[Probe]:
        return [p for p in (self.before, self.after) if p is not None]


def sessions_of(runs: Any) -> list[Session]:
    """The probes of each session (run_id) of runs.parquet rows (a pandas DataFrame)."""

    def read(value: object) -> Probe | None:
        return Probe.from_json(value) if isinstance(value, str) else None  # null: None or NaN

    first = runs.drop_duplicates("run_id")
    pairs = zip(first["probe_before_json"], first["probe_after_json"], strict=True)
    return [Session(read(before), read(after)) for before, after in pairs]


def change(a: float, b: float) -> float:
    """How much two speeds differ, as a fraction of the slower: 0.25 for 100 vs 125 either way."""
    return max(a / b, b / a) - 1.0


def _best_rate(work: float, run: Any, repeats: int) -> float:
    """work / the fastest of `repeats` timed calls of `run` (after one untimed warm-up)."""
    run()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return work / best


def cpu_matmul_gflops(n: int = MATMUL_N, repeats: int = MATMUL_REPEATS) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    return _best_rate(2.0 * n**3 / 1e9, lambda: np.matmul(a, b, out=out), repeats)


def cpu_copy_gbs(nbytes: int = COPY_BYTES, repeats: int = COPY_REPEATS) -> float:
    src = np.ones(nbytes, dtype=np.uint8)  # written once: its pages exist before timing
    dst = np.zeros_like(src)
    return _best_rate(2.0 * nbytes / 1e9, lambda: np.copyto(dst, src), repeats)


async def _round_trips(rounds: int) -> list[int]:
    loop = asyncio.get_running_loop()
    times = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        future = loop.create_future()
        loop.call_soon(future.set_result, None)
        await future
        times.append(time.perf_counter_ns() - start)
    return times


def loop_wakeup_us(rounds: int = LOOP_ROUNDS) -> float:
    """The median call_soon round trip on a fresh event loop, in µs; call it outside any loop."""
    return statistics.median(asyncio.run(_round_trips(rounds))) / 1e3


def gpu_available() -> bool:
    """NVML reports a GPU and torch is installed. Decided without importing torch (seconds):
    whether torch has CUDA, the child process finds out."""
    if importlib.util.find_spec("torch") is None:
        return False
    with nvml() as nv:
        return nv is not None and nv.nvmlDeviceGetCount() > 0


def _gpu_figures() -> dict[str, float]:
    """The GPU figures, measured in this process (the child's side of `gpu_figures`)."""
    import torch  # only in the child process: its import takes seconds

    if not torch.cuda.is_available():
        raise RuntimeError("torch has no CUDA (a CPU build, or no usable driver)")
    device = torch.device("cuda", 0)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    n = 8192  # 1.1 TFLOP a product: about 2 ms on an H100
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(2**30, device=device, dtype=torch.uint8)  # 1 GiB, beyond any L2
    dst = torch.empty_like(src)

    def best_ms(run: Any, repeats: int = 10) -> float:
        run()
        torch.cuda.synchronize(device)
        best = math.inf
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            run()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
        return best

    gemm_ms = best_ms(lambda: a @ b)
    copy_ms = best_ms(lambda: dst.copy_(src))
    return {
        "gpu_gemm_tflops": 2.0 * n**3 / (gemm_ms / 1e3) / 1e12,
        "gpu_copy_gbs": 2.0 * src.numel() / (copy_ms / 1e3) / 1e9,
    }


def gpu_figures() -> dict[str, float]:
    """The GPU figures from a child process (see the module docstring); {} where there is no
    GPU, or the child fails (logged with its reason)."""
    if not gpu_available():
        return {}
    try:
        out = subprocess.run(
            [sys.executable, "-m", "bench.probe", "--gpu-only"],
            capture_output=True,
            text=True,
            timeout=GPU_TIMEOUT_S,
            check=True,
        )
        figures: dict[str, float] = json.loads(out.stdout)
        return figures
    except (subprocess.SubprocessError, ValueError) as exc:
        stderr = getattr(exc, "stderr", None) or ""
        log.warning("GPU speed probe failed, so only the CPU is probed: %s %s", exc, stderr[-500:])
        return {}


def measure(gpu: bool = True) -> Probe:
    """Probe the machine now; gpu=False skips the GPU part."""
    start = time.perf_counter()
    taken_at = datetime.now(UTC).isoformat(timespec="seconds")
    figures = {
        "cpu_matmul_gflops": cpu_matmul_gflops(),
        "cpu_copy_gbs": cpu_copy_gbs(),
        "loop_wakeup_us": loop_wakeup_us(),
        **(gpu_figures() if gpu else {}),
    }
    return Probe(taken_at=taken_at, wall_s=time.perf_counter() - start, **figures)


if __name__ == "__main__":
    if sys.argv[1:] == ["--gpu-only"]:
        print(json.dumps(_gpu_figures()))
    else:
        print(measure().to_json())
