"""The engine's C kernels for the CPU (runtime/csrc/*.c), built and loaded.

- paged_attention.c: decode attention and cache writes over the paged cache
  (runtime/attention/cpu_kernel.py).
- panel_gemm.c: the linear layers' matmul over float32 or int8 weights packed at load
  (runtime/layers/linear.py, PanelWeight; runtime/quantization.py, Int8PanelWeight).
- elementwise.c: RMSNorm with the residual add fused, SiLU-and-multiply and rotary embedding
  (runtime/layers/norm.py, activation.py, rotary.py).

They are compiled together, on first use, with the machine's C compiler (`cc`, or $CC) into a
per-user cache keyed by sources, flags and CPU, then loaded with ctypes (which drops the GIL
for each call). No compiler or a failed build means torch's own operations run instead, and
the log says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = sorted(CSRC.glob("*.c"))
HEADERS = sorted(CSRC.glob("*.h"))  # part of the cache key, as the sources are
# Reassociation lets the compiler vectorise the dot products (it may reorder their sums). Not
# -ffast-math: linking a library with it sets flush-to-zero for the whole process when the
# library loads, silently changing every float computation in it (the test suite caught this).
FLAGS = ("-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")  # fmt: skip
CACHE_ENV = "RUNTIME_KERNEL_CACHE"  # where built kernels are kept (default ~/.cache/...)


class KernelUnavailableError(RuntimeError):
    """The C kernels cannot be built or loaded here; the message says why."""


def float32_rows(x: torch.Tensor, kernel: str) -> torch.Tensor:
    """x as the kernels index it: 2-D [rows, last dim] float32, each row dense (rows may lie
    apart: the kernels take a row stride), copied only where it must be. Anything else would
    be read as the wrong bytes, so it is refused, naming `kernel`. Only CPU models use the
    kernels, so x is a CPU tensor."""
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if flat.dtype is not torch.float32:
        raise TypeError(f"{kernel}: float32 inputs only, not {flat.dtype}")
    return flat if flat.stride(1) == 1 else flat.contiguous()


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "llm-serving-bench" / "kernels"
    return Path(os.environ.get(CACHE_ENV) or default)


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(lines))  # one copy per distinct line, not one per core


@functools.cache
def load_kernels() -> ctypes.CDLL:
    """The built library, compiled now unless an identical build is cached. Raises
    KernelUnavailableError naming the cause; the outcome is remembered for the process."""
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        raise KernelUnavailableError("no C compiler on PATH (cc, or set CC)")
    parts = [f.read_bytes() for f in (*SOURCES, *HEADERS)]
    key = hashlib.sha256(b"\0".join([*parts, " ".join(FLAGS).encode(), compiler.encode(),
                                     _cpu_identity().encode()])).hexdigest()[:16]  # fmt: skip
    path = _cache_dir() / f"runtime-kernels-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Built beside its final name and renamed into place: processes starting together
        # (a test run's servers) never load a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", tmp],
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
            if done.returncode != 0:
                raise KernelUnavailableError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelUnavailableError(f"cannot load {path}: {exc}") from exc
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.paged_decode_f32.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, i64, ptr, i64, i64,
                                     ctypes.c_float, i64, ptr, ctypes.c_int, ptr]  # fmt: skip
    lib.paged_decode_f32.restype = ctypes.c_int
    lib.paged_store_f32.argtypes = [ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64]
    lib.paged_store_f32.restype = None
    lib.panel_gemm_f32.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ctypes.c_int]
    lib.panel_gemm_f32.restype = None
    lib.panel_gemm_i8.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.panel_gemm_i8.restype = None
    lib.rms_norm_f32.argtypes = [ptr, i64, i64, i64, ptr, ptr, ctypes.c_float, ptr, ctypes.c_int]
    lib.rms_norm_f32.restype = None
    lib.silu_and_mul_f32.argtypes = [ptr, i64, i64, ptr, ctypes.c_int]
    lib.silu_and_mul_f32.restype = None
    lib.rope_f32.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ctypes.c_int]
    lib.rope_f32.restype = None
    return lib
