"""Rotary position embedding (Llama's rotate-half form) with llama3, linear and YaRN scaling."""

from __future__ import annotations

import ctypes
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def _inv_freq(
    head_dim: int, theta: float, scaling: Mapping[str, Any] | None
) -> tuple[torch.Tensor, float]:
    """The rotation frequencies, and the factor cos and sin are scaled by (YaRN's; else 1)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv, 1.0
    kind = scaling["rope_type"]
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled), 1.0
    if kind == "yarn":
        return _yarn(inv, head_dim, theta, factor, scaling)
    raise ValueError(f"rope scaling {kind!r} is not supported; supported: linear, llama3, yarn")


def _yarn(
    inv: torch.Tensor, head_dim: int, theta: float, factor: float, scaling: Mapping[str, Any]
) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv:2309.00071) as transformers computes it: dimensions that turn more than
    beta_fast times over the original context keep their frequency, those under beta_slow
    are slowed by `factor`, a linear ramp between; attention is sharpened by 0.1 ln(factor) + 1
    through cos and sin (GPT-OSS: factor 32 over 4096 original positions)."""
    old_len = float(scaling["original_max_position_embeddings"])
    fast, slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:  # the dimension turning `rotations` times
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(fast), dim_of(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low)
            / (high - low if high != low else 0.001)).clamp(0, 1)  # fmt: skip
    kept = 1 - ramp  # 1 where the frequency extrapolates unchanged
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv / factor * (1 - kept) + inv * kept, float(attention)


@dataclass(frozen=True)
class Rope:
    """The rotation of one step's positions, looked up once and applied in every layer."""

    cos: torch.Tensor  # [tokens, 1, head_dim], contiguous
    sin: torch.Tensor  # [tokens, 1, head_dim], first half negated (see RotaryEmbedding)
    native: ctypes.CDLL | None = None  # runtime/native.py's library: rotate in elementwise.c

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, heads, head_dim] rotated by its tokens' positions, in x's dtype. The C
        path rotates x in place (q and k are views of the step's fresh qkv output)."""
        if self.native is not None:
            return self._native(x)
        h = x.float()
        half = h.shape[-1] // 2
        # rotate_half(h) * sin == roll(h, half) * (sin with its first half negated): one roll
        # instead of a chunk, a negation and a cat.
        return torch.addcmul(h * self.cos, h.roll(half, dims=-1), self.sin).to(x.dtype)

    def _native(self, x: torch.Tensor) -> torch.Tensor:
        assert self.native is not None
        if x.dtype is not torch.float32:
            raise TypeError(f"the C rotary embedding takes float32, not {x.dtype}")
        tokens, heads, head_dim = x.shape
        if x.stride(2) != 1 or x.stride(1) != head_dim:  # tokens may lie apart, heads dense
            x = x.contiguous()
        self.native.rope_f32(x.data_ptr(), tokens, heads, x.stride(0), head_dim,
                             self.cos.data_ptr(), self.sin.data_ptr(),
                             torch.get_num_threads())  # fmt: skip
        return x


class RotaryEmbedding(nn.Module):
    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: Mapping[str, Any] | None
    ) -> None:
        super().__init__()
        inv_freq, attention = _inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        sign = torch.cat([-torch.ones_like(freqs), torch.ones_like(freqs)], dim=-1)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", (emb.cos() * attention).float(), persistent=False)
        self.register_buffer("sin", (emb.sin() * sign * attention).float(), persistent=False)
        # runtime/native.py's library once a float32 CPU model is loaded (elementwise.c)
        self.native: ctypes.CDLL | None = None

    def forward(self, positions: torch.Tensor) -> Rope:
        # Indexing gives fresh contiguous rows, as the C path reads them.
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        return Rope(cos, sin, self.native)
