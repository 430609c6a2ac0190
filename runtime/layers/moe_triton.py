"""The routed experts on a GPU in a fixed number of kernels, with no host synchronisation, so a
MoE layer can be captured in a CUDA graph (vLLM's `moe_align_block_size` + `fused_moe_kernel`).

`Experts.forward` (runtime/layers/moe.py) computes the same sum but brings the per-expert token
counts to the host and loops over experts in Python. Here:

1. `align_by_expert` sorts the T * top_k (token, expert) assignments by expert in torch, each
   expert's run padded with a sentinel to a multiple of BLOCK_M, so every block of BLOCK_M
   sorted slots belongs to one expert. Its outputs have lengths fixed by shapes alone (an
   upper bound on the padded total), and blocks past the real ones are marked -1.
2. `_grouped_gemm_kernel` runs one (block, column tile) per program: it gathers the block's
   rows of A, multiplies them by its expert's weight and writes each row back to its
   assignment. It runs twice: x -> gate_up (with its bias), then, after the activation in
   torch, -> down scaled by the routing weight.
3. Each token's top_k rows are summed in torch: deterministic, no atomics.

Grids come from (T, top_k, E) only; blocks marked -1 return at once. `fused_experts_mxfp4`
runs the same kernels over weights held in MXFP4 (layers/mxfp4.py): each W tile is decoded in
registers from its packed nibbles and group scales, so no float copy of the weights exists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from runtime.layers import mxfp4

# Untuned (no GPU has run this kernel yet): the smallest tiles tl.dot takes (16) for rows, so
# decode's few assignments per expert waste little padding, and modest N and K tiles.
BLOCK_M = 16
BLOCK_N = 64
BLOCK_K = 32
# An MXFP4 K tile covers whole groups of 32 values: no tile splits a group's scale.
assert BLOCK_K % mxfp4.GROUP == 0, f"BLOCK_K {BLOCK_K} must be a multiple of {mxfp4.GROUP}"


def align_by_expert(
    experts: torch.Tensor, num_experts: int, block_m: int = BLOCK_M
) -> tuple[torch.Tensor, torch.Tensor]:
    """The assignments of `experts` [T, top_k] (an assignment's id is its index in
    experts.flatten(), T * top_k of them), grouped by expert -> (sorted_ids, block_experts).

    sorted_ids [num_blocks * block_m]: expert 0's assignments (in id order), then padding up
    to the next multiple of block_m, then expert 1's, ...; an expert with none takes no slot.
    Padding, and every slot after the last expert's run, holds the sentinel T * top_k.
    block_experts [num_blocks]: the expert of each block of block_m slots, -1 past the end.

    No op here waits for the device (no bincount, nonzero, .item() or mask indexing), and
    num_blocks depends on shapes only: each of the at most min(E, T * top_k) experts in use
    pads by at most block_m - 1 slots, and the padded total is a multiple of block_m."""
    flat = experts.flatten()
    assignments = flat.numel()
    used = min(num_experts, assignments)
    num_blocks = (assignments + used * (block_m - 1)) // block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)  # where each expert's padded run ends
    run_start = padded_end - padded
    first = torch.cumsum(counts, 0) - counts  # each expert's first place in the sorted order
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(assignments, device=flat.device) - first[expert_of]
    sorted_ids = torch.full((num_blocks * block_m,), assignments, dtype=torch.int64,
                            device=flat.device)  # fmt: skip
    sorted_ids.scatter_(0, run_start[expert_of] + rank, order)
    # Block b starts at slot b * block_m: its expert is the first whose padded run ends after
    # it (an empty expert's run ends where the previous one's does, so it is never picked).
    block_start = torch.arange(num_blocks, device=flat.device) * block_m
    owner = torch.searchsorted(padded_end, block_start, right=True)
    block_experts = torch.where(owner < num_experts, owner, -1)
    return sorted_ids, block_experts


# Kernel arguments are annotated tl.tensor, what Triton passes them as (scalars included);
# Triton reads only the tl.constexpr annotations.
@triton.jit  # type: ignore[untyped-decorator, misc]
def _grouped_gemm_kernel(
    a_ptr: tl.tensor, w_ptr: tl.tensor, scales_ptr: tl.tensor, bias_ptr: tl.tensor,
    out_ptr: tl.tensor, sorted_ids_ptr: tl.tensor, block_experts_ptr: tl.tensor,
    route_ptr: tl.tensor, assignments: tl.tensor, n: tl.tensor, k: tl.tensor,
    stride_am: tl.tensor, stride_we: tl.tensor, stride_wn: tl.tensor, stride_wk: tl.tensor,
    stride_se: tl.tensor, stride_sn: tl.tensor, stride_sk: tl.tensor,
    stride_be: tl.tensor, stride_om: tl.tensor,
    A_ROW_DIV: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE_ROWS: tl.constexpr,
    W_MXFP4: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
) -> None:  # fmt: skip
    """out[id, cols] = A[id // A_ROW_DIV] @ W[e][cols].T (+ bias[e][cols]) (* route[id]) for
    the ids of one block, e its expert; A_ROW_DIV is top_k where A holds a row per token, 1
    where it holds one per assignment. Sentinel ids (>= assignments) read and write nothing.

    W_MXFP4: W is MXFP4, w_ptr its bytes [E, n, k / 2] (value k in byte k // 2, low nibble
    first) and scales_ptr its group scales [E, n, k / 32]; k is a multiple of 32 and BLOCK_K
    too. Otherwise W is [E, n, k] in A's dtype and scales_ptr is not read."""
    block = tl.program_id(0).to(tl.int64)
    expert = tl.load(block_experts_ptr + block).to(tl.int64)
    if expert < 0:
        return  # past the last expert's run: the grid's upper bound, nothing to do
    ids = tl.load(sorted_ids_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    real = ids < assignments
    a_rows = a_ptr + (ids // A_ROW_DIV) * stride_am
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    w_cols = w_ptr + expert * stride_we + cols * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, k, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows[:, None] + ks[None, :], mask=real[:, None] & (ks[None, :] < k),
                    other=0.0)  # fmt: skip
        w_mask = (ks[:, None] < k) & (cols[None, :] < n)
        # W[e] is [n, k]: its [BLOCK_K, BLOCK_N] tile is read transposed, as vLLM's kernel does.
        if W_MXFP4:
            # Each byte and scale is gathered once per value it holds (2 and 32 of them): the
            # repeats hit the same cache lines, and the tile stays one plain load's shape.
            packed = tl.load(w_cols[None, :] + (ks // 2)[:, None] * stride_wk, mask=w_mask,
                             other=0).to(tl.int32)  # fmt: skip
            nibble = (packed >> ((ks % 2) * 4)[:, None]) & 0xF
            # e2m1 (exponent bits 1-2, mantissa bit 0) as float32 bits: e == 0 is m * 0.5
            # (0.5 is 0x3F000000), else (1 + m / 2) * 2^(e - 1), biased exponent e + 126 and m
            # the top mantissa bit. Every value, and its product with the scale, is exact.
            exp = (nibble >> 1) & 0x3
            man = nibble & 0x1
            mag = tl.where(exp == 0, man * 0x3F000000, ((exp + 126) << 23) | (man << 22))
            mag = mag.to(tl.float32, bitcast=True)
            value = tl.where((nibble & 0x8) != 0, -mag, mag)
            # 2^(s - 127) built from its float32 bits: s in the exponent field (exact, unlike
            # exp2), and s == 0's 2^-127 as the subnormal 0x00400000.
            s_cols = scales_ptr + expert * stride_se + cols * stride_sn
            s = tl.load(s_cols[None, :] + (ks // 32)[:, None] * stride_sk, mask=w_mask,
                        other=127).to(tl.int32)  # fmt: skip
            scale = tl.where(s == 0, 0x00400000, s << 23).to(tl.float32, bitcast=True)
            w = (value * scale).to(a_ptr.dtype.element_ty)  # exact in float32 and bfloat16
        else:
            w = tl.load(w_cols[None, :] + ks[:, None] * stride_wk, mask=w_mask, other=0.0)
        if DOT_F32:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_be + cols, mask=cols < n, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if SCALE_ROWS:
        acc *= tl.load(route_ptr + ids, mask=real, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + ids[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=real[:, None] & (cols[None, :] < n))  # fmt: skip


# The interpreter keeps bfloat16 as raw uint16 bits and multiplies those in tl.dot
# (triton-lang/triton#11584), so there the products run on float32 copies (exact conversions;
# only the summation order differs from the GPU). float32 inputs use "ieee" precision on the
# GPU too: TF32 would miss the torch path by ~1e-3.
_INTERPRETED = isinstance(_grouped_gemm_kernel, InterpretedFunction)


def _grouped_gemm(
    a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, sorted_ids: torch.Tensor,
    block_experts: torch.Tensor, a_row_div: int, route: torch.Tensor | None,
    w_scales: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """[T * top_k, n]: row id is a[id // a_row_div] @ w[e].T (+ bias[e]) (* route[id]) with e
    the expert of assignment id; w is [E, n, k], or with w_scales MXFP4 blocks [E, n, k / 32,
    16] and their scales [E, n, k / 32] (layers/mxfp4.py)."""
    assignments = a.shape[0] * a_row_div  # a holds a row per token or per assignment
    if w_scales is None:
        _, n, k = w.shape
        scales = w  # never read
    else:
        assert w.dtype == w_scales.dtype == torch.uint8, (
            f"MXFP4 blocks {w.dtype} and scales {w_scales.dtype} must be uint8"
        )
        assert w.shape[:-1] == w_scales.shape and w.shape[-1] * 2 == mxfp4.GROUP, (
            f"MXFP4 blocks {tuple(w.shape)} and scales {tuple(w_scales.shape)}: expected "
            f"[E, n, groups, {mxfp4.GROUP // 2}] and [E, n, groups]"
        )
        _, n, groups, _ = w.shape
        k = groups * mxfp4.GROUP
        w = w.flatten(-2)  # [E, n, k / 2] bytes, value j in byte j // 2 (a view when contiguous)
        scales = w_scales
    assert a.shape[1] == k, f"a has {a.shape[1]} columns; the weight takes {k}"
    assert a.stride(-1) == 1 and (bias is None or bias.stride(-1) == 1)
    # The interpreter truncates float32 to bfloat16 where the GPU rounds to nearest (its casts
    # pass no rounding mode; seen in Triton 3.9): there the kernel stores float32 and torch
    # rounds, so interpreted results are rounded as compiled ones are.
    out = torch.empty(assignments, n, dtype=torch.float32 if _INTERPRETED else a.dtype,
                      device=a.device)  # fmt: skip
    grid = (block_experts.numel(), triton.cdiv(n, BLOCK_N))
    # Without a bias or routing weights the kernel never reads those pointers: any tensor does.
    _grouped_gemm_kernel[grid](
        a, w, scales, a if bias is None else bias, out, sorted_ids, block_experts,
        a if route is None else route,
        assignments, n, k, a.stride(0), w.stride(0), w.stride(1), w.stride(2),
        scales.stride(0), scales.stride(1), scales.stride(2),
        0 if bias is None else bias.stride(0), out.stride(0),
        A_ROW_DIV=a_row_div, HAS_BIAS=bias is not None, SCALE_ROWS=route is not None,
        W_MXFP4=w_scales is not None, DOT_F32=a.dtype == torch.float32 or _INTERPRETED,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return out.to(a.dtype)


def fused_experts(
    x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
    gate_up_bias: torch.Tensor, down: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:  # fmt: skip
    """What `Experts.forward` returns, without a host synchronisation: for x [T, H], experts
    and weights [T, top_k] (expert ids, float32 routing weights), out[t] = sum_k weights[t, k]
    * act(x[t] @ gate_up[e].T + gate_up_bias[e]) @ down[e].T with e = experts[t, k]; gate_up
    is [E, 2I, H], gate_up_bias [E, 2I], down [E, H, I]. The down bias is not added.

    Intermediates are in x's dtype, as the torch path's are; the routing weight multiplies the
    float32 accumulator before its one rounding."""
    assert x.dtype == gate_up.dtype == down.dtype, (
        f"x {x.dtype}, gate_up {gate_up.dtype} and down {down.dtype} must share one dtype"
    )
    return _fused(x, experts, weights, gate_up, None, gate_up_bias, down, None, act)


def fused_experts_mxfp4(
    x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
    gate_up_blocks: torch.Tensor, gate_up_scales: torch.Tensor, gate_up_bias: torch.Tensor,
    down_blocks: torch.Tensor, down_scales: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:  # fmt: skip
    """`fused_experts` over weights held in MXFP4 (layers/mxfp4.py): what it returns given
    `mxfp4.dequantize(blocks, scales, x.dtype)` of each, but each W tile is decoded inside the
    kernel, so the weights are read at 4.25 bits a value and never copied to floats.
    gate_up_blocks is uint8 [E, 2I, H / 32, 16], gate_up_scales [E, 2I, H / 32]; down_blocks
    [E, H, I / 32, 16], down_scales [E, H, I / 32]. The products run in x's dtype (every
    MXFP4 value is exact in bfloat16), accumulated in float32."""
    hidden, inter = x.shape[-1], gate_up_blocks.shape[1] // 2
    assert hidden % mxfp4.GROUP == 0 and inter % mxfp4.GROUP == 0, (
        f"MXFP4 groups {mxfp4.GROUP} input values: hidden {hidden} and intermediate {inter} "
        "must be multiples"
    )
    return _fused(x, experts, weights, gate_up_blocks, gate_up_scales, gate_up_bias,
                  down_blocks, down_scales, act)  # fmt: skip


def _fused(
    x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
    gate_up_scales: torch.Tensor | None, gate_up_bias: torch.Tensor, down: torch.Tensor,
    down_scales: torch.Tensor | None, act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:  # fmt: skip
    """Both fused paths: align, gate_up, act, down, sum; scales None for float weights."""
    tokens, top_k = experts.shape
    if tokens == 0:
        return torch.zeros_like(x)
    sorted_ids, block_experts = align_by_expert(experts, gate_up.shape[0])
    x = x.contiguous()
    h = _grouped_gemm(x, gate_up, gate_up_bias.contiguous(), sorted_ids, block_experts, top_k,
                      None, gate_up_scales)  # fmt: skip
    y = _grouped_gemm(act(h).contiguous(), down, None, sorted_ids, block_experts, 1,
                      weights.reshape(-1).contiguous(), down_scales)  # fmt: skip
    return y.view(tokens, top_k, -1).sum(1)
