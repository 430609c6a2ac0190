"""The GPU backend: the reference backend with the cache write and decode attention in Triton.

Same head-major layout as the reference ([2, num_blocks, num_kv_heads, block_size, head_dim]),
so one K/V head's block is a contiguous [block_size, head_dim] tile and every load below is a
run of whole rows.

- `_store_kernel` writes a step's new keys and values into their slots, one program per token;
  a slot < 0 (a padding row of a CUDA-graph batch) writes nothing.
- `_decode_kernel` is flash-decoding over the block table: a program per (sequence, K/V head,
  split) walks its part of the context tile by tile with an online softmax in float32, for all
  the query heads of that K/V head's GQA group at once, so each K/V byte is read once per
  group. A context of length 0 (a padding row) reads nothing and outputs zeros.
- Splits: with few (sequence, K/V head) pairs (batch 1 of a model with 8 K/V heads: 8 programs
  for 132 SMs) most of the GPU would wait, so each context is cut into PARTITION-token parts,
  one program each, and `_combine_kernel` merges the parts' (max, sum, output) as
  flash-decoding does (vLLM's paged attention v2). Whether to split is decided from shapes
  alone (the block table's width bounds the context), so a step stays capturable.
- A sliding window of W keys moves each program's first key up to context - W (parts wholly
  before it see no key); tiles stay aligned, so their keys before it are masked, never loaded.
  Sinks join the softmax as a key already seen with no value: m = sink, l = 1 (in exp2 units)
  from the start with one part, or as one more part in `_combine_kernel` with several.

Graph safety: a step in which every sequence decodes must not synchronise with the host, as it
is captured in CUDA graphs and replayed with new metadata. The reference's `forward` tells it
from shapes alone (as many new tokens as sequences, and every sequence has at least one new
token, so each has exactly one) and hands it to `_paged_decode`: both kernels launch with grids
fixed by shapes and read context lengths and block tables from device memory. Only a step with
prefill chunks, never captured, goes through the reference planning (`.tolist()`).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from runtime.attention.reference import TorchAttention

# Decode attention is memory-bound: per K/V element loaded, a GQA group of G query heads does
# 2G multiply-adds. With bfloat16 on CUDA cores that is about the H100's ridge point already,
# so both products go through tl.dot (tensor cores) with the group padded to at least 16 rows
# (the MMA tile; padding rows are zero queries and are never stored) and tiles of at least 16
# keys. The wasted MMA work is free, the loads are not. float32 inputs use "ieee" precision:
# TF32 would miss the reference by ~1e-3.
MIN_DOT = 16
MAX_TILE = 64  # keys per step of the online softmax: bounds the registers a program holds
PARTITION = 512  # context tokens per program when contexts are split (vLLM v2's size)
# Split when there are fewer (sequence, K/V head) programs than this many per SM: below it the
# GPU has SMs idle for the whole step.
PROGRAMS_PER_SM = 2
# The softmax runs in exp2: scores are scaled by log2(e) (qk_scale), and so must a sink be.
LOG2E: tl.constexpr = tl.constexpr(math.log2(math.e))


# Kernel arguments are annotated tl.tensor, what Triton passes them as (scalars included);
# Triton reads only the tl.constexpr annotations.
@triton.jit  # type: ignore[untyped-decorator, misc]
def _store_kernel(
    k_ptr: tl.tensor, v_ptr: tl.tensor, k_cache_ptr: tl.tensor, v_cache_ptr: tl.tensor,
    slot_ptr: tl.tensor,
    stride_kt: tl.tensor, stride_kh: tl.tensor, stride_vt: tl.tensor, stride_vh: tl.tensor,
    stride_cb: tl.tensor, stride_ch: tl.tensor, stride_cs: tl.tensor,
    KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    KV_HEADS_P2: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
) -> None:  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return  # a padding row of a CUDA-graph batch: nothing to store
    heads = tl.arange(0, KV_HEADS_P2)
    dims = tl.arange(0, HEAD_DIM_P2)
    inside = (heads[:, None] < KV_HEADS) & (dims[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :],
                mask=inside)  # fmt: skip
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :],
                mask=inside)  # fmt: skip
    where = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
    where += heads[:, None] * stride_ch + dims[None, :]
    tl.store(k_cache_ptr + where, k.to(k_cache_ptr.dtype.element_ty), mask=inside)
    tl.store(v_cache_ptr + where, v.to(v_cache_ptr.dtype.element_ty), mask=inside)


@triton.jit  # type: ignore[untyped-decorator, misc]
def _decode_kernel(
    q_ptr: tl.tensor, k_cache_ptr: tl.tensor, v_cache_ptr: tl.tensor, table_ptr: tl.tensor,
    lens_ptr: tl.tensor, out_ptr: tl.tensor, part_ptr: tl.tensor, stats_ptr: tl.tensor,
    sinks_ptr: tl.tensor, qk_scale: tl.tensor,
    stride_qt: tl.tensor, stride_qh: tl.tensor, stride_ot: tl.tensor, stride_oh: tl.tensor,
    stride_table: tl.tensor, stride_cb: tl.tensor, stride_ch: tl.tensor, stride_cs: tl.tensor,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GROUP_P2: tl.constexpr, HEAD_DIM_P2: tl.constexpr, TILE: tl.constexpr,
    DOT_F32: tl.constexpr, SPLITS: tl.constexpr, PART_TOKENS: tl.constexpr,
    WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
) -> None:  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    context = tl.load(lens_ptr + seq)
    # This program's keys: [first, last). With one split, the whole context (or its window).
    first = split * PART_TOKENS  # a multiple of TILE
    last = tl.minimum(context, first + PART_TOKENS) if SPLITS > 1 else context
    begin = first  # where the tiles start: TILE-aligned, at or before `first`
    if WINDOW > 0:
        first = tl.maximum(first, context - WINDOW)
        begin = first // TILE * TILE
    rows = tl.arange(0, GROUP_P2)  # query heads kv_head * GROUP + row, as SDPA's enable_gqa
    dims = tl.arange(0, HEAD_DIM_P2)
    keys = tl.arange(0, TILE)
    real = (rows[:, None] < GROUP) & (dims[None, :] < HEAD_DIM)
    heads = kv_head * GROUP + rows
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + dims[None, :], mask=real,
                other=0.0)  # fmt: skip
    head_base = kv_head * stride_ch
    table = table_ptr + seq * stride_table

    m = tl.full([GROUP_P2], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_P2], tl.float32)  # noqa: E741 (the softmax's usual name)
    if HAS_SINKS and SPLITS == 1:
        # The sink as a key already seen whose value is zero: its e^sink joins l, not acc. (With
        # several parts _combine_kernel adds it once.) Padding rows keep m = -inf, l = 0.
        m = tl.load(sinks_ptr + heads, mask=rows < GROUP, other=float("-inf")).to(tl.float32)
        m = m * LOG2E
        l = tl.where(rows < GROUP, 1.0, 0.0)  # noqa: E741
    acc = tl.zeros([GROUP_P2, HEAD_DIM_P2], tl.float32)
    # Runs cdiv(last - begin, TILE) times: none for a padding row or a split past the context
    # (or before its window), and never past a context's last block or before the block of its
    # first key, so the table's -1 padding and the blocks before a window are never read.
    for start in range(begin, last, TILE):
        pos = start + keys
        valid = (pos >= first) & (pos < last)
        if BLOCK_SIZE % TILE == 0:
            # The tile lies in one block (block sizes 16, 32, ...): one table read, and the
            # tile is one contiguous run of memory.
            block = tl.load(table + start // BLOCK_SIZE).to(tl.int64)
            offsets = block * stride_cb + ((start % BLOCK_SIZE) + keys) * stride_cs
        else:
            # Small or odd block sizes: the tile spans blocks, each key finds its own.
            block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            offsets = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs
        tile = head_base + offsets[:, None] + dims[None, :]
        loaded = valid[:, None] & (dims[None, :] < HEAD_DIM)
        # Keys and values in the query's dtype, as the reference multiplies them.
        k = tl.load(k_cache_ptr + tile, mask=loaded, other=0.0).to(q_ptr.dtype.element_ty)
        v = tl.load(v_cache_ptr + tile, mask=loaded, other=0.0).to(q_ptr.dtype.element_ty)
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))  # [GROUP_P2, TILE]
        # Every tile holds at least one valid key, so m_new is finite and no exp2 sees NaN.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)  # noqa: E741
        # The weights are rounded to the values' dtype, as on tensor cores (and the reference).
        p_dot = p.to(v.dtype)
        if DOT_F32:
            pv = tl.dot(p_dot.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p_dot, v)
        acc = acc * alpha[:, None] + pv
        m = m_new

    if SPLITS == 1:
        # An empty context leaves l == 0 and acc == 0: output zeros, not 0 / 0.
        out = acc / tl.where(l > 0.0, l, 1.0)[:, None]
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=real)  # fmt: skip
    else:
        # This part's unnormalised output and its (max, sum) in float32, for _combine_kernel:
        # parts [seqs, heads, SPLITS, HEAD_DIM_P2], stats [seqs, heads, SPLITS, 2].
        at = (seq * GROUP * tl.num_programs(1) + heads) * SPLITS + split
        tl.store(part_ptr + at[:, None] * HEAD_DIM_P2 + dims[None, :], acc,
                 mask=rows[:, None] < GROUP)  # fmt: skip
        tl.store(stats_ptr + at * 2, m, mask=rows < GROUP)
        tl.store(stats_ptr + at * 2 + 1, l, mask=rows < GROUP)


@triton.jit  # type: ignore[untyped-decorator, misc]
def _combine_kernel(
    part_ptr: tl.tensor, stats_ptr: tl.tensor, out_ptr: tl.tensor, sinks_ptr: tl.tensor,
    stride_ot: tl.tensor, stride_oh: tl.tensor,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr, SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr, HAS_SINKS: tl.constexpr,
) -> None:  # fmt: skip
    """One program per (sequence, query head): out = sum_i e^(m_i - M) acc_i / sum_i
    e^(m_i - M) l_i over its parts, M the largest m_i; a part that saw no key has m = -inf and
    weighs 0, and a context with no key at all outputs zeros. A sink is one more part, with
    m = sink, l = 1 and acc = 0."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    parts = tl.arange(0, SPLITS_P2)
    dims = tl.arange(0, HEAD_DIM_P2)
    row = (seq * tl.num_programs(1) + head) * SPLITS + parts
    have = parts < SPLITS
    m = tl.load(stats_ptr + row * 2, mask=have, other=float("-inf"))
    l = tl.load(stats_ptr + row * 2 + 1, mask=have, other=0.0)  # noqa: E741
    top = tl.max(m, axis=0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * LOG2E
        top = tl.maximum(top, sink)
    weight = tl.where(m > float("-inf"), tl.exp2(m - tl.where(top > float("-inf"), top, 0.0)),
                      0.0)  # fmt: skip
    acc = tl.load(part_ptr + row[:, None] * HEAD_DIM_P2 + dims[None, :], mask=have[:, None],
                  other=0.0)  # fmt: skip
    total = tl.sum(weight * l, axis=0)
    if HAS_SINKS:
        total += tl.exp2(sink - top)
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)  # fmt: skip


# The interpreter keeps bfloat16 as raw uint16 bits and multiplies those in tl.dot
# (triton-lang/triton#11584, unsupported upstream), so there the products run on float32 copies;
# converting bfloat16 to float32 is exact, so only the summation order differs from the GPU.
_INTERPRETED = isinstance(_decode_kernel, InterpretedFunction)


def _p2(n: int, floor: int = 1) -> int:
    return max(floor, int(triton.next_power_of_2(n)))


def store_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    heads_first: bool = True,
) -> None:  # fmt: skip
    """Write k and v ([tokens, kv_heads, head_dim]) into their slots; a slot < 0 is skipped.

    The cache is [2, blocks, kv_heads, block_size, head_dim] (heads_first, this backend's) or
    [2, blocks, block_size, kv_heads, head_dim] (flash-attn's)."""
    head_dim = kv_cache.shape[-1]
    kv_heads, block_size = kv_cache.shape[2:4] if heads_first else kv_cache.shape[3:1:-1]
    assert k.stride(-1) == v.stride(-1) == 1 and kv_cache.is_contiguous()
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    head_stride, slot_stride = (key_cache.stride(1), key_cache.stride(2))[
        :: 1 if heads_first else -1
    ]
    _store_kernel[(k.shape[0],)](
        k, v, key_cache, value_cache, slot_mapping.contiguous(),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        key_cache.stride(0), head_stride, slot_stride,
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        KV_HEADS_P2=_p2(kv_heads), HEAD_DIM_P2=_p2(head_dim),
    )  # fmt: skip


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Looked up once per device: splits_for runs for every layer of every eager step."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 132  # Triton's interpreter: a GPU-sized count, so the tests take the same decisions


def splits_for(programs: int, max_context: int, device: torch.device,
               partition: int = PARTITION) -> int:  # fmt: skip
    """How many parts each context is cut into: 1 when the (sequence, K/V head) programs
    already fill the GPU, else enough parts of `partition` tokens to cover `max_context` (the
    longest a context can be, from the block table's width: shapes only, no host sync)."""
    if programs >= PROGRAMS_PER_SM * _sm_count(device):
        return 1
    return max(1, -(-max_context // partition))


def paged_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    partition: int = PARTITION,
) -> torch.Tensor:
    """Attention of one query token per sequence ([seqs, heads, head_dim]) over its context,
    or with `sliding_window` W its last W keys, with `sinks` [heads] in each head's softmax.

    Reads block_tables[i, :cdiv(context_lens[i], block_size)] only (from the block of the
    window's first key on): entries past those (-1 padding) may hold anything. A sequence with
    context_lens[i] == 0 outputs zeros. `partition` (tokens per split, a multiple of the tile)
    is a parameter for the tests.
    """
    seqs, heads, head_dim = q.shape
    _, _, kv_heads, block_size, _ = kv_cache.shape
    assert heads % kv_heads == 0, f"{heads} query heads do not split into {kv_heads} K/V heads"
    assert q.stride(-1) == 1 and kv_cache.is_contiguous() and block_tables.stride(-1) == 1
    group = heads // kv_heads
    tile = min(_p2(block_size, MIN_DOT), MAX_TILE)
    assert partition % tile == 0, f"partition {partition} is not a multiple of the tile {tile}"
    splits = splits_for(seqs * kv_heads, block_tables.shape[1] * block_size, q.device, partition)
    out = torch.empty_like(q)
    dim_p2 = _p2(head_dim, MIN_DOT)
    # The parts' outputs and (max, sum): used only when splitting (a 1-element stand-in else).
    shape = (seqs, heads, splits) if splits > 1 else (1, 1, 1)
    parts = torch.empty(*shape, dim_p2, dtype=torch.float32, device=q.device)
    stats = torch.empty(*shape, 2, dtype=torch.float32, device=q.device)
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    # Without sinks the kernels never read sinks_ptr: any tensor stands in.
    sink_logits = q if sinks is None else sinks.contiguous()
    _decode_kernel[(seqs, kv_heads, splits)](
        q, key_cache, value_cache, block_tables, context_lens.contiguous(), out, parts, stats,
        sink_logits, scale * math.log2(math.e),  # the softmax runs in exp2
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        GROUP_P2=_p2(group, MIN_DOT), HEAD_DIM_P2=_p2(head_dim, MIN_DOT),
        TILE=tile, DOT_F32=q.dtype == torch.float32 or _INTERPRETED,
        SPLITS=splits, PART_TOKENS=partition, WINDOW=sliding_window or 0,
        HAS_SINKS=sinks is not None,
        num_warps=4,
    )  # fmt: skip
    if splits > 1:
        _combine_kernel[(seqs, heads)](
            parts, stats, out, sink_logits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_P2=dim_p2, SPLITS=splits, SPLITS_P2=_p2(splits),
            HAS_SINKS=sinks is not None,
        )  # fmt: skip
    return out


class TritonAttention(TorchAttention):
    """The reference backend, with the cache write and decode attention in Triton kernels."""

    name = "triton"
    supports_cuda_graphs = True

    def _write(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        store_kv(k, v, kv_cache, slot_mapping)

    def _paged_decode(
        self, q: torch.Tensor, kv_cache: torch.Tensor, tables: torch.Tensor,
        context_lens: torch.Tensor, scale: float, sliding_window: int | None,
        sinks: torch.Tensor | None,
    ) -> torch.Tensor:  # fmt: skip
        return paged_decode(q, kv_cache, tables, context_lens, scale, sliding_window, sinks)
