"""MXFP4 (OCP microscaling FP4), the format of OpenAI's GPT-OSS expert weights.

A weight's rows are cut into groups of 32 values along the input dimension; each group holds 32
FP4 (e2m1) values, two a byte with the low nibble first (`blocks`, uint8 [..., rows, groups,
16]), and one shared power of two (`scales`, uint8 [..., rows, groups], biased by 127). 4.25
bits a value: GPT-OSS-20B's experts take 10 GB instead of 38 GB in bfloat16.
"""

from __future__ import annotations

import torch

# The magnitudes of an FP4 (e2m1) nibble's low 3 bits; its top bit is the sign.
FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
GROUP = 32  # values sharing one scale
SCALE_BIAS = 127


def _check(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] * 2 != GROUP:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)}: expected "
            f"[..., groups, {GROUP // 2}] and [..., groups]"
        )


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., rows, groups, 16] blocks and [..., rows, groups] scales -> [..., rows, groups * 32]
    in `dtype` (every MXFP4 value is exact in bfloat16 and float32)."""
    _check(blocks, scales)
    table = torch.tensor(FP4_MAGNITUDES + tuple(-m for m in FP4_MAGNITUDES), device=blocks.device)
    packed = blocks.to(torch.uint8).long()
    values = torch.stack([table[packed & 0x0F], table[packed >> 4]], dim=-1).flatten(-2)
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - SCALE_BIAS)
    return values.flatten(-2).to(dtype)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., rows, K] (K a multiple of 32) -> (blocks, scales): each group's scale the smallest
    power of two that brings its largest magnitude within FP4's 6, each value rounded to the
    nearest FP4 value. A weight that came from MXFP4 (a dequantised checkpoint) dequantises
    back to the same values: each is an FP4 value times a power of two no smaller than the
    recomputed scale, which FP4 holds exactly."""
    *lead, rows, k = weight.shape
    if k % GROUP:
        raise ValueError(f"MXFP4 groups {GROUP} values along the input; {k} is not a multiple")
    w = weight.detach().float().contiguous().view(*lead, rows, k // GROUP, GROUP)
    top = w.abs().amax(dim=-1)
    # top / 2^s <= 6 needs s >= log2(top / 6); an all-zero group takes any scale.
    exponent = torch.ceil(torch.log2(torch.where(top > 0, top, 1.0) / 6.0)).to(torch.int32)
    exponent = exponent.clamp(-SCALE_BIAS, 255 - SCALE_BIAS)
    scaled = torch.ldexp(w, -exponent[..., None])
    # The nearest magnitude (ties to the lower one), found against the midpoints between
    # them; its index is the nibble's low 3 bits.
    magnitudes = torch.tensor(FP4_MAGNITUDES, device=w.device)
    nearest = torch.bucketize(scaled.abs(), (magnitudes[1:] + magnitudes[:-1]) / 2)
    nibbles = nearest | ((scaled < 0) & (nearest > 0)).long() << 3
    pairs = nibbles.reshape(*lead, rows, k // GROUP, GROUP // 2, 2)
    blocks = (pairs[..., 0] | pairs[..., 1] << 4).to(torch.uint8)
    return blocks, (exponent + SCALE_BIAS).to(torch.uint8)
