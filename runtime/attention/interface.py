"""What every attention backend takes and gives.

A backend chooses the cache layout (`kv_cache_shape`). A step's tokens are flattened across
sequences; `AttentionMetadata` says where each new token's K/V goes (`slot_mapping` =
block_id * block_size + offset) and which blocks hold each sequence's context. One `forward`
handles prefill (whole or chunked, after a cached prefix), decode, and a mix of them.
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
    ) -> torch.Tensor: ...  # [tokens, heads, head_dim]
