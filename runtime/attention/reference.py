"""The reference backend: plain PyTorch over a head-major paged cache, on any device.

Its layout is [2 (k, v), num_blocks, num_kv_heads, block_size, head_dim], so that a block's
keys for one head are one contiguous matrix and decode attention can multiply gathered blocks
in place. The CPU and Triton backends share the layout and the prefill path; they replace the
cache write and decode (`_write`, `_paged_decode`).

A sliding window and sinks (interface.py) are applied per call, never through the per-step
plan: GPT-OSS alternates windowed and full layers within one step, over one plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.attention.interface import AttentionMetadata, check_features


@dataclass(frozen=True)
class DecodeGroup:
    rows: torch.Tensor  # flat rows of these decoders (one new token each)
    blocks: torch.Tensor  # [decoders, their most blocks], padding pointed at block 0
    context_lens: torch.Tensor  # [decoders]
    mask: torch.Tensor  # [decoders, 1, 1, context]: keys within each context


@dataclass(frozen=True)
class _Plan:
    """How a step's sequences are grouped, computed once and shared by every layer."""

    decode: DecodeGroup | None  # None when no sequence decodes this step
    prefills: list[tuple[int, int, int, torch.Tensor]]  # (first row, end row, context, blocks)


class TorchAttention:
    """The reference backend: plain PyTorch, runs anywhere.

    Decoding sequences (one new token each) share one batched attention call over their
    gathered contexts, padded to the longest (splitting short from long contexts into two calls
    measured within noise on mixed lengths); prefill chunks, few per step, go one by one
    (padding them to a common width would multiply every decoder's work by the chunk length).
    """

    name = "torch"
    supports_cuda_graphs = False  # plans each step on the host (.tolist())

    def __init__(self) -> None:
        self._plan: tuple[AttentionMetadata, _Plan] | None = None

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, num_kv_heads, block_size, head_dim)

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
        device = meta.slot_mapping.device
        group = None
        if decoders:
            index = torch.tensor(decoders, dtype=torch.long, device=device)
            # Padded to the longest of the decoders' own contexts: a prefill in the same step
            # may have a longer block table, which the decoders must not pay for.
            width = max(-(-lengths[i] // block_size) for i in decoders)
            tables = meta.block_tables[index, :width]
            keys = torch.arange(width * block_size, device=device)
            lens = meta.context_lens[index]
            mask = keys[None, :] < lens[:, None]
            group = DecodeGroup(meta.query_start_loc[index], tables.clamp(min=0), lens,
                                mask[:, None, None, :])  # fmt: skip
        plan = _Plan(group, prefills)
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
        sliding_window: int | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_features(q.shape[1], sliding_window, sinks)
        self._write(k, v, kv_cache, meta.slot_mapping)
        if meta.decode_only:
            out = self._paged_decode(q, kv_cache, meta.block_tables, meta.context_lens, scale,
                                     sliding_window, sinks)  # fmt: skip
            if out is not None:  # no plan needed (nor, on CUDA, a host synchronisation)
                return out
        return self._attend(q, kv_cache, meta, scale, sliding_window, sinks)

    def _write(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """The step's new keys and values into their slots (every slot a real one, >= 0)."""
        block_size = kv_cache.shape[3]
        blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
        kv_cache[0, blocks, :, offsets] = k.to(kv_cache.dtype)
        kv_cache[1, blocks, :, offsets] = v.to(kv_cache.dtype)

    def _attend(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        sliding_window: int | None, sinks: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """Attention of every new token over its sequence's cache, new tokens included."""
        _, _, kv_heads, block_size, head_dim = kv_cache.shape
        plan = self._plan_for(meta, block_size)
        out = torch.empty_like(q)
        if plan.decode is not None:
            rows = plan.decode.rows
            out[rows] = self._decode(q[rows], kv_cache, plan.decode, scale, sliding_window, sinks)
        for lo, hi, length, table in plan.prefills:
            n = hi - lo
            # Keys before `first` lie outside every new token's window: not even gathered.
            first = 0 if sliding_window is None else max(0, length - n - sliding_window + 1)
            skip = first // block_size * block_size  # the whole blocks before it
            # [kv_heads, tokens, head_dim] of the sequence's blocks from `first` on, in order.
            k_ctx, v_ctx = (
                kv_cache[which]
                .index_select(0, table[first // block_size :])
                .transpose(0, 1)
                .reshape(kv_heads, -1, head_dim)[:, first - skip : length - skip]
                .to(q.dtype)
                for which in (0, 1)
            )
            # Query j of the n new tokens sits at position length - n + j and sees keys up to
            # it (diagonal `ahead` of key column c = position first + c), and within a window
            # keys after its position - W.
            ahead = length - n - first
            mask = torch.ones(n, length - first, dtype=torch.bool, device=q.device).tril(ahead)
            if sliding_window is not None:
                mask = mask.triu(ahead - sliding_window + 1)
            if sinks is not None:
                k_ctx, v_ctx, mask = _with_sink_column(k_ctx, v_ctx, mask, sinks)
            o = F.scaled_dot_product_attention(
                q[lo:hi].transpose(0, 1), k_ctx, v_ctx, attn_mask=mask, scale=scale,
                enable_gqa=True,
            )  # fmt: skip
            out[lo:hi] = o.transpose(0, 1)
        return out

    def _paged_decode(
        self, q: torch.Tensor, kv_cache: torch.Tensor, tables: torch.Tensor,
        context_lens: torch.Tensor, scale: float, sliding_window: int | None,
        sinks: torch.Tensor | None,
    ) -> torch.Tensor | None:  # fmt: skip
        """Decode attention of q [decoders, heads, head_dim] read straight through the block
        tables [decoders, width] by a kernel, for the backends that have one: entries past a
        context (-1 padding) are never read, a context of 0 reads nothing and gives zeros.
        With a window W only a context's last W keys are seen (and read); sinks join each
        head's softmax (interface.py). None here: the reference gathers instead, after
        planning the step."""
        return None

    def _decode(
        self, q: torch.Tensor, kv_cache: torch.Tensor, group: DecodeGroup, scale: float,
        sliding_window: int | None, sinks: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        paged = self._paged_decode(q, kv_cache, group.blocks, group.context_lens, scale,
                                   sliding_window, sinks)  # fmt: skip
        if paged is not None:
            return paged
        return self._gathered_decode(q, kv_cache, group, scale, sliding_window, sinks)

    @staticmethod
    def _gathered_decode(
        q: torch.Tensor, kv_cache: torch.Tensor, group: DecodeGroup, scale: float,
        sliding_window: int | None, sinks: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        """One query row per sequence against its gathered blocks, block by block: the
        head-major blocks are multiplied where the gather put them (no transposed copy of the
        context), and only the small score tensor is rearranged for the softmax.

        Padding keys (block 0 for -1 entries, slots past a context's end) are masked, but their
        values still meet a zero weight: the cache must hold finite numbers everywhere
        (allocate it zeroed, never with torch.empty), as 0 * NaN is NaN.
        """
        decoders, (_, _, kv_heads, block_size, head_dim) = len(q), kv_cache.shape
        blocks = group.blocks.shape[1]
        # index_select on a flat index: ~4x faster on CPU than advanced indexing by the table.
        flat = group.blocks.flatten()
        shape = (decoders, blocks, kv_heads, block_size, head_dim)
        keys, values = (kv_cache[w].index_select(0, flat).view(shape).to(q.dtype) for w in (0, 1))
        grouped = q.view(decoders, 1, kv_heads, -1, head_dim)  # [d, 1, kv, group, hd]
        scores = grouped @ keys.transpose(-1, -2) * scale  # [d, blocks, kv, group, bs]
        # Softmax over each sequence's whole context: blocks and slots together.
        scores = scores.permute(0, 2, 3, 1, 4).reshape(decoders, kv_heads, -1, blocks * block_size)
        visible = group.mask
        if sliding_window is not None:  # a decoder (at position context - 1) sees its last W
            keys_at = torch.arange(blocks * block_size, device=q.device)
            first = group.context_lens - sliding_window
            visible = visible & (keys_at[None, :] >= first[:, None])[:, None, None, :]
        scores.masked_fill_(~visible, float("-inf"))
        if sinks is not None:  # one more logit per head, whose weight is dropped: no value
            sink = sinks.to(scores.dtype).view(1, kv_heads, -1, 1).expand(decoders, -1, -1, 1)
            scores = torch.cat([scores, sink], dim=-1)
        weights = torch.softmax(scores, dim=-1)[..., : blocks * block_size]
        weights = weights.reshape(decoders, kv_heads, -1, blocks, block_size)
        o = weights.permute(0, 3, 1, 2, 4) @ values  # [d, blocks, kv, group, hd]
        return o.sum(dim=1).view(decoders, -1, head_dim)


def _with_sink_column(
    k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SDPA has no sinks, but one more key does the same exactly: a zero key (q.0 = 0) whose
    additive mask is the head's sink makes its score the sink, and its zero value adds nothing
    to the output. k, v [kv_heads, keys, head_dim] and mask [queries, keys] (True = visible)
    become [.., keys + 1, ..] and a float mask [heads, queries, keys + 1]."""
    pad = (0, 0, 0, 1)  # one more row along keys
    heads, (queries, _) = sinks.shape[0], mask.shape
    bias = torch.zeros(mask.shape, dtype=k.dtype, device=k.device).masked_fill_(~mask, -torch.inf)
    sink = sinks.to(k.dtype).view(heads, 1, 1).expand(heads, queries, 1)
    return F.pad(k, pad), F.pad(v, pad), torch.cat([bias.expand(heads, -1, -1), sink], dim=-1)
