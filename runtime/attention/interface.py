"""What every attention backend takes and gives.

A backend chooses the cache layout (`kv_cache_shape`). A step's tokens are flattened across
sequences; `AttentionMetadata` says where each new token's K/V goes (`slot_mapping` =
block_id * block_size + offset) and which blocks hold each sequence's context. One `forward`
handles prefill (whole or chunked, after a cached prefix), decode, and a mix of them.

Two optional features, as GPT-OSS uses them (Hugging Face's eager GptOss attention is the
ground truth), are part of every backend's `forward`:

- `sliding_window` W: a query at position p sees only keys at positions k with
  p - W < k <= p (flash-attn's window_size=(W - 1, 0)); None is full causal attention. It is a
  mask only: the cache still holds every token. Sequence i's new tokens are the last n_i of
  its context_lens[i], so new token j of n sits at position context - n + j.
- `sinks` [heads] (this rank's query heads, in q's order): a learned logit per head that joins
  the softmax's denominator but carries no value. For one query row with scores
  s_t = scale * q.k_t over its visible keys, out = sum_t e^(s_t) v_t / (e^sink + sum_t e^(s_t)).

A query with no visible key (a CUDA-graph padding row, context 0) outputs zeros, with or
without a sink.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [tokens]: cache slot of each new token
    query_start_loc: torch.Tensor  # [seqs + 1]: where each sequence's new tokens start
    context_lens: torch.Tensor  # [seqs]: tokens in each sequence's cache after this step
    block_tables: torch.Tensor  # [seqs, max blocks], padded with -1

    @property
    def decode_only(self) -> bool:
        """Every sequence decodes (one new token each): as many tokens as sequences, since
        each has at least one. Told from shapes alone, so no host synchronisation."""
        return self.slot_mapping.shape[0] == self.context_lens.shape[0]


class AttentionBackend(Protocol):
    name: str  # as logged
    # Whether a step in which every sequence decodes runs without a host synchronisation and
    # honours CUDA-graph padding rows (slot -1: write nothing; context 0: read nothing), so
    # cuda_graphs.py may capture it.
    supports_cuda_graphs: bool

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """The shape of one layer's cache, in this backend's layout."""
        ...

    def forward(
        self,
        q: torch.Tensor,  # [tokens, heads, head_dim]
        k: torch.Tensor,  # [tokens, kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        sinks: torch.Tensor | None = None,  # [heads], float32
    ) -> torch.Tensor: ...  # [tokens, heads, head_dim]


def check_features(heads: int, sliding_window: int | None, sinks: torch.Tensor | None) -> None:
    """Refuse a window or sinks no kernel can honour; shapes and Python values only, so a
    CUDA-graph capture may call it."""
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(
            f"sliding_window must be at least 1 (or None for full attention), got {sliding_window}"
        )
    if sinks is not None and tuple(sinks.shape) != (heads,):
        raise ValueError(
            f"sinks must hold one logit per query head, shape ({heads},), got {tuple(sinks.shape)}"
        )
