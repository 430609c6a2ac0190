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


@dataclass(frozen=True)
class _Plan:
    """How a step's sequences are grouped, computed once and shared by every layer."""

    decode_rows: torch.Tensor  # flat rows of the sequences decoding one token
    decode_blocks: torch.Tensor  # [decoders, max blocks], padding pointed at block 0
    decode_mask: torch.Tensor  # [decoders, 1, 1, context]: keys within each context
    prefills: list[tuple[int, int, int, torch.Tensor]]  # (first row, end row, context, blocks)


class TorchAttention:
    """The reference backend: plain PyTorch, runs anywhere.

    Decoding sequences (one new token each) share one batched attention call over their
    gathered, padded contexts; prefill chunks, few per step, go one by one (padding them to a
    common width would multiply the work of every decoder in the step by the chunk length).
    """

    def __init__(self) -> None:
        self._plan: tuple[AttentionMetadata, _Plan] | None = None

    def _plan_for(self, meta: AttentionMetadata, block_size: int) -> _Plan:
        if self._plan is not None and self._plan[0] is meta:
            return self._plan[1]
        starts = meta.query_start_loc.tolist()
        lengths = meta.context_lens.tolist()
        decoders, prefills = [], []
        for i, context in enumerate(lengths):
            lo, hi = starts[i], starts[i + 1]
            if hi - lo == 1:
                decoders.append(i)
            else:
                blocks = meta.block_tables[i, : -(-context // block_size)]
                prefills.append((lo, hi, context, blocks))
        index = torch.tensor(decoders, dtype=torch.long, device=meta.slot_mapping.device)
        tables = meta.block_tables[index]
        keys = torch.arange(tables.shape[1] * block_size, device=index.device)
        mask = keys[None, :] < meta.context_lens[index][:, None]
        plan = _Plan(
            decode_rows=meta.query_start_loc[index],
            decode_blocks=tables.clamp(min=0),
            decode_mask=mask[:, None, None, :],
            prefills=prefills,
        )
        self._plan = (meta, plan)
        return plan

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
        plan = self._plan_for(meta, block_size)
        out = torch.empty_like(q)

        def context(blocks: torch.Tensor, which: int) -> torch.Tensor:
            """[..., kv_heads, tokens, head_dim] of the given blocks, in order."""
            x = kv_cache[which, blocks]  # [..., blocks, block_size, kv_heads, head_dim]
            x = x.reshape(*blocks.shape[:-1], -1, kv_heads, head_dim)
            return x.transpose(-3, -2).to(q.dtype)

        if len(plan.decode_rows):
            # Plain matmuls with the query heads grouped under their KV head: no repeated K/V,
            # and faster on CPU than SDPA's masked path for a single query row.
            # Padding keys (block 0 for -1 entries, slots past a context's end) are masked,
            # but their values still meet a zero weight: the cache must hold finite numbers
            # everywhere (allocate it zeroed, never with torch.empty), as 0 * NaN is NaN.
            decoders = len(plan.decode_rows)
            grouped = q[plan.decode_rows].view(decoders, kv_heads, -1, head_dim)
            scores = grouped @ context(plan.decode_blocks, 0).transpose(-1, -2) * scale
            scores.masked_fill_(~plan.decode_mask, float("-inf"))
            o = torch.softmax(scores, dim=-1) @ context(plan.decode_blocks, 1)
            out[plan.decode_rows] = o.view(decoders, -1, head_dim)
        for lo, hi, length, blocks in plan.prefills:
            n = hi - lo
            # Query j of the n new tokens sits at position length - n + j and sees keys up to it.
            mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
            o = F.scaled_dot_product_attention(
                q[lo:hi].transpose(0, 1),
                context(blocks, 0)[:, :length], context(blocks, 1)[:, :length],
                attn_mask=mask, scale=scale, enable_gqa=True,
            )  # fmt: skip
            out[lo:hi] = o.transpose(0, 1)
        return out
