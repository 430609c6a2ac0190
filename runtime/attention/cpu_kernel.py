"""The CPU backend: the reference backend with decode attention and cache writes in C.

On the CPU, decode attention in plain PyTorch must gather every decoder's blocks into one
padded tensor per layer and multiply the padding too; with mixed lengths most of that work is
padding. `runtime/csrc/paged_attention.c` reads each sequence's keys and values where they
lie, through its block table, so a step costs the sum of its contexts, not their count times
the longest. A step in which every sequence decodes skips the reference's per-step planning
altogether. Prefill chunks stay with the reference (SDPA, one chunk at a time).

The kernels are built on first use (runtime/native.py). No compiler, a failed build, or a
dtype other than float32 means the reference backend instead, and selection.py says why in
the log.
"""

from __future__ import annotations

import torch

from runtime.attention.reference import TorchAttention
from runtime.native import load_kernels


class CpuKernelAttention(TorchAttention):
    """The reference backend, with decode attention and cache writes in paged_attention.c
    (float32 caches). Every tensor handed to the kernels is contiguous: they index raw
    memory."""

    name = "cpu-kernel"
    supports_cuda_graphs = False  # a CPU backend (it does honour padding rows, as the tests use)

    def __init__(self) -> None:
        super().__init__()
        lib = load_kernels()
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
        context_lens: torch.Tensor, scale: float, sliding_window: int | None,
        sinks: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        _check(kv_cache, q)
        _, num_blocks, kv_heads, block_size, head_dim = kv_cache.shape
        q, tables, lens = q.contiguous(), tables.contiguous(), context_lens.contiguous()
        # The kernel reads sinks as [heads] float32 (forward checked the length); NULL: none.
        sink_rows = None if sinks is None else sinks.to(torch.float32).contiguous()
        out = torch.empty_like(q)
        failed = self._decode_kernel(
            q.data_ptr(), kv_cache.data_ptr(), num_blocks, kv_heads, block_size, head_dim,
            tables.data_ptr(), tables.shape[1], lens.data_ptr(), q.shape[0], q.shape[1], scale,
            sliding_window or 0, None if sink_rows is None else sink_rows.data_ptr(),
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
