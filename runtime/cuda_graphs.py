"""CUDA graphs for decode steps, captured at load for bucketed batch sizes (vLLM's scheme).

A decode step of a small batch launches a few hundred small kernels, and on a GPU their launch
cost, not the GPU, bounds it. Each graph replays one bucket's whole forward (embedding to final
norm; the LM head stays eager, as it needs only the sampling rows and gathers over ranks) in
one launch.

The rules a replayed step follows:
- Only a step in which every sequence decodes (one new token each, as many tokens as
  sequences) and which fits the largest bucket; any other runs eagerly.
- A step of n sequences runs in the smallest bucket of at least n; rows n.. are padding:
  token 0 at position 0, slot -1 (the backend's store writes nothing) and context length 0
  (attention reads nothing). Their outputs are dropped.
- The graphs read their inputs from static buffers, which each step is copied into; a block
  table row keeps stale entries past the step's width, which no context reaches.
- The backend must say `supports_cuda_graphs`: no host synchronisation in a decode step.
- All graphs share one memory pool, captured largest first, so they take about the memory of
  the largest alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from runtime.attention.interface import AttentionMetadata
from runtime.models.llama import LlamaForCausalLM

MAX_GRAPH_BATCH = 512  # larger batches are compute-bound: launches no longer matter


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The buckets: 1, 2, 4, then every multiple of 8, up to max_num_seqs (itself included,
    so every batch the scheduler can make has one) and at most MAX_GRAPH_BATCH."""
    top = min(max_num_seqs, MAX_GRAPH_BATCH)
    return sorted({s for s in (1, 2, 4, *range(8, top, 8)) if s < top} | {top})


def graph_size_for(meta: AttentionMetadata, sizes: list[int]) -> int | None:
    """The bucket a step replays in, or None when it runs eagerly."""
    num_seqs = meta.context_lens.shape[0]
    if not meta.decode_only or num_seqs > sizes[-1]:
        return None
    return next(s for s in sizes if s >= num_seqs)


@dataclass(frozen=True)
class DecodeBatch:
    """A decode step's model inputs, as a graph reads them."""

    input_ids: torch.Tensor  # [size]
    positions: torch.Tensor  # [size]
    meta: AttentionMetadata


class StaticInputs:
    """The buffers the graphs read, and the copy of each step into them."""

    def __init__(self, max_batch: int, max_blocks: int, device: torch.device) -> None:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        self.input_ids, self.positions = zeros(max_batch), zeros(max_batch)
        self.slot_mapping, self.context_lens = zeros(max_batch), zeros(max_batch)
        self.block_tables = zeros(max_batch, max_blocks)
        self.query_start_loc = torch.arange(max_batch + 1, device=device)

    def view(self, size: int) -> DecodeBatch:
        """The first `size` rows: the same memory for every step, as a graph requires."""
        meta = AttentionMetadata(
            self.slot_mapping[:size], self.query_start_loc[: size + 1],
            self.context_lens[:size], self.block_tables[:size],
        )  # fmt: skip
        return DecodeBatch(self.input_ids[:size], self.positions[:size], meta)

    def fill(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, size: int
    ) -> DecodeBatch:
        """Copy a decode step of n <= size sequences in, rows n.. as padding."""
        n, width = meta.block_tables.shape
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.context_lens[:n].copy_(meta.context_lens)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.input_ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.slot_mapping[n:size].fill_(-1)
        self.context_lens[n:size].zero_()
        return self.view(size)


def run_batch(
    model: LlamaForCausalLM, kv_caches: list[torch.Tensor], batch: DecodeBatch
) -> torch.Tensor:
    """The forward a graph captures: hidden states [size, hidden]."""
    return model(batch.input_ids, batch.positions, kv_caches, batch.meta)  # type: ignore[no-any-return]


class DecodeGraphs:
    """One captured graph per bucket, and the replay of a step in its bucket."""

    def __init__(
        self, model: LlamaForCausalLM, kv_caches: list[torch.Tensor], max_num_seqs: int,
        max_blocks: int, device: torch.device,
    ) -> None:  # fmt: skip
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.static = StaticInputs(self.sizes[-1], max_blocks, device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        start = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):
            batch = self.static.view(size)  # all padding: nothing is read or written
            run_batch(model, kv_caches, batch)  # warm-up: Triton compiles, cuBLAS plans
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = run_batch(model, kv_caches, batch)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(device)
        self.capture_s = time.perf_counter() - start

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor | None:
        """Hidden states [n, hidden] of a decode step by replay, or None if it has no graph."""
        size = graph_size_for(meta, self.sizes)
        if size is None:
            return None
        self.static.fill(input_ids, positions, meta, size)
        self.graphs[size].replay()
        return self.outputs[size][: meta.context_lens.shape[0]]
