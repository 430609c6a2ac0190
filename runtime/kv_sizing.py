"""How many KV cache blocks fit: on CUDA, what gpu_memory_utilization leaves after the model.

vLLM's rule: of the device's total memory, the engine may use `gpu_memory_utilization`; the
weights, the peak activations of the largest step (measured by a profiling forward of
max_num_batched_tokens tokens) and the memory outside torch's allocator (CUDA context, NCCL,
other processes) come first, and the KV cache gets the rest, in whole blocks. The arithmetic
is here, pure, so it is tested without a GPU; the measuring is in runtime/model_runner.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from runtime.attention.interface import AttentionBackend

GIB = 1 << 30


@dataclass(frozen=True)
class MemoryProfile:
    """One device's memory after loading and profiling, in bytes."""

    total: int  # the device's whole memory
    weights: int  # torch-allocated after loading: parameters and buffers
    peak_activations: int  # the profiling forward's peak allocation above the weights
    non_torch: int  # used on the device but not reserved by this process's torch

    def describe(self) -> str:
        return (
            f"total {self.total / GIB:.2f} GiB, weights {self.weights / GIB:.2f} GiB, "
            f"peak activations {self.peak_activations / GIB:.2f} GiB, "
            f"non-torch {self.non_torch / GIB:.2f} GiB"
        )


def kv_block_bytes(
    backend: AttentionBackend, num_layers: int, block_size: int, num_kv_heads: int,
    head_dim: int, dtype: torch.dtype,
) -> int:  # fmt: skip
    """Bytes of one block across all layers: K and V of `block_size` tokens for this rank's
    K/V heads (2 * layers * block_size * kv_heads * head_dim * itemsize in TorchAttention's
    layout), read from the backend's own shape so any layout counts right."""
    shape = backend.kv_cache_shape(1, block_size, num_kv_heads, head_dim)
    return num_layers * math.prod(shape) * dtype.itemsize


def kv_blocks_for(
    memory: MemoryProfile, utilization: float, bytes_per_block: int, min_blocks: int
) -> int:
    """The blocks that fit in `utilization` of the device after everything else; raises
    unless at least `min_blocks` (one max_model_len sequence) fit."""
    budget = memory.total * utilization
    available = budget - memory.weights - memory.peak_activations - memory.non_torch
    blocks = max(0, math.floor(available / bytes_per_block))
    if blocks >= min_blocks:
        return blocks
    figures = (
        f"gpu_memory_utilization={utilization} allows {budget / GIB:.2f} GiB of "
        f"{memory.describe()}; that leaves {available / GIB:.2f} GiB for the KV cache, "
        f"and one block takes {bytes_per_block / (1 << 20):.2f} MiB"
    )
    if blocks == 0:
        raise ValueError(
            f"no KV cache block fits: {figures}. Raise gpu_memory_utilization, or make the "
            "model smaller on this device (quantization, tensor_parallel_size, "
            "max_num_batched_tokens for the activations)"
        )
    raise ValueError(
        f"{blocks} KV cache blocks fit but one max_model_len sequence needs {min_blocks}: "
        f"{figures}. Lower max_model_len or raise gpu_memory_utilization"
    )
