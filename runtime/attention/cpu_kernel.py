"""The CPU backend: the reference backend with decode attention and cache writes in C.

On the CPU, decode attention in plain PyTorch must gather every decoder's blocks into one
padded tensor per layer and multiply the padding too; with mixed lengths most of that work is
padding. `cpu_kernel.c` reads each sequence's keys and values where they lie, through its
block table, so a step costs the sum of its contexts, not their count times the longest. A
step in which every sequence decodes skips the reference's per-step planning altogether.
Prefill chunks stay with the reference (SDPA, one chunk at a time).

The kernel is compiled on first use with the machine's C compiler (`cc`, or $CC) into a
per-user cache keyed by source, flags and CPU, then loaded with ctypes (which drops the GIL
for the call). No compiler, a failed build, or a dtype other than float32 means the reference
backend instead, and selection.py says why in the log.
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

from runtime.attention.reference import TorchAttention

SOURCE = Path(__file__).with_name("cpu_kernel.c")
# Reassociation lets the compiler vectorise the dot products (it may reorder their sums). Not
# -ffast-math: linking a library with it sets flush-to-zero for the whole process when the
# library loads, silently changing every float computation in it (the test suite caught this).
FLAGS = ("-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
         "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")  # fmt: skip
CACHE_ENV = "RUNTIME_KERNEL_CACHE"  # where built kernels are kept (default ~/.cache/...)


class KernelUnavailableError(RuntimeError):
    """The C kernel cannot be built or loaded here; the message says why."""


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
def load_kernel() -> ctypes.CDLL:
    """The built kernel, compiled now unless an identical build is cached. Raises
    KernelUnavailableError naming the cause; the outcome is remembered for the process."""
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        raise KernelUnavailableError("no C compiler on PATH (cc, or set CC)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(),
                                     _cpu_identity().encode()])).hexdigest()[:16]  # fmt: skip
    path = _cache_dir() / f"cpu_kernel-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Built beside its final name and renamed into place: processes starting together
        # (a test run's servers) never load a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp],
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
                                     ctypes.c_float, ctypes.c_int, ptr]  # fmt: skip
    lib.paged_decode_f32.restype = ctypes.c_int
    lib.paged_store_f32.argtypes = [ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64]
    lib.paged_store_f32.restype = None
    return lib


class CpuKernelAttention(TorchAttention):
    """The reference backend, with decode attention and cache writes in cpu_kernel.c (float32
    caches). Every tensor handed to the kernels is contiguous: they index raw memory."""

    name = "cpu-kernel"
    supports_cuda_graphs = False  # a CPU backend (it does honour padding rows, as the tests use)

    def __init__(self) -> None:
        super().__init__()
        lib = load_kernel()
        self._decode_kernel, self._store_kernel = lib.paged_decode_f32, lib.paged_store_f32

    def _write(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        _check(kv_cache, k)
        _, num_blocks, kv_heads, block_size, head_dim = kv_cache.shape
        k, v, slots = k.contiguous(), v.contiguous(), slot_mapping.contiguous()
        self._store_kernel(
            k.data_ptr(), v.data_ptr(), slots.data_ptr(), len(slots), kv_cache.data_ptr(),
            num_blocks, kv_heads, block_size, head_dim,
        )  # fmt: skip

    def _paged_decode(
        self, q: torch.Tensor, kv_cache: torch.Tensor, tables: torch.Tensor,
        context_lens: torch.Tensor, scale: float,
    ) -> torch.Tensor:  # fmt: skip
        _check(kv_cache, q)
        _, num_blocks, kv_heads, block_size, head_dim = kv_cache.shape
        q, tables, lens = q.contiguous(), tables.contiguous(), context_lens.contiguous()
        out = torch.empty_like(q)
        failed = self._decode_kernel(
            q.data_ptr(), kv_cache.data_ptr(), num_blocks, kv_heads, block_size, head_dim,
            tables.data_ptr(), tables.shape[1], lens.data_ptr(), q.shape[0], q.shape[1], scale,
            torch.get_num_threads(), out.data_ptr(),
        )  # fmt: skip
        if failed:
            raise MemoryError("paged_decode_f32 could not allocate its score buffer")
        return out


def _check(kv_cache: torch.Tensor, x: torch.Tensor) -> None:
    # selection.py only picks this backend for float32 CPU models, whose caches are allocated
    # contiguous; anything else would be read as the wrong bytes, so it is refused here.
    if not (kv_cache.dtype == x.dtype == torch.float32 and kv_cache.is_contiguous()
            and kv_cache.device.type == "cpu"):  # fmt: skip
        raise TypeError(
            f"cpu-kernel attention needs a contiguous float32 CPU cache and inputs, got "
            f"{kv_cache.dtype} on {kv_cache.device} and {x.dtype}"
        )
