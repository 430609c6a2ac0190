"""Attention over the paged KV cache, behind one backend interface.

The cache of one layer is a tensor [2 (k, v), num_blocks, block_size, num_kv_heads, head_dim].
A step's tokens are flattened across sequences; `AttentionMetadata` says where each new token's
K/V goes (`slot_mapping` = block_id * block_size + offset) and which blocks hold each sequence's
context. One call handles prefill (whole or chunked, after a cached prefix), decode, and a mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [tokens]: cache slot of each new token
    query_start_loc: torch.Tensor  # [seqs + 1]: where each sequence's new tokens start
    context_lens: torch.Tensor  # [seqs]: tokens in each sequence's cache after this step
    block_tables: torch.Tensor  # [seqs, max blocks], padded with -1


class AttentionBackend(Protocol):
    def forward(
        self,
        q: torch.Tensor,  # [tokens, heads, head_dim]
        k: torch.Tensor,  # [tokens, kv_heads, head_dim]
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...  # [tokens, heads, head_dim]


class TorchAttention:
    """The reference backend: plain PyTorch, one sequence at a time; runs anywhere."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
        flat = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
        flat[0].index_copy_(0, meta.slot_mapping, k.to(kv_cache.dtype))
        flat[1].index_copy_(0, meta.slot_mapping, v.to(kv_cache.dtype))
        group = q.shape[1] // kv_heads
        out = torch.empty_like(q)
        starts = meta.query_start_loc.tolist()
        for i, (length, table) in enumerate(
            zip(meta.context_lens.tolist(), meta.block_tables.tolist(), strict=True)
        ):
            blocks = torch.tensor(table[: -(-length // block_size)], device=q.device)
            keys = kv_cache[0, blocks].reshape(-1, kv_heads, head_dim)[:length]
            values = kv_cache[1, blocks].reshape(-1, kv_heads, head_dim)[:length]
            lo, hi = starts[i], starts[i + 1]
            n = hi - lo
            # Query j of the n new tokens sits at position length - n + j and sees keys up to it.
            mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
            o = F.scaled_dot_product_attention(
                q[lo:hi].transpose(0, 1),
                keys.repeat_interleave(group, dim=1).transpose(0, 1).to(q.dtype),
                values.repeat_interleave(group, dim=1).transpose(0, 1).to(q.dtype),
                attn_mask=mask,
                scale=scale,
            )
            out[lo:hi] = o.transpose(0, 1)
        return out
