"""Rotary position embedding (Llama's rotate-half form) with llama3 and linear scaling."""

from __future__ import annotations

import ctypes
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def _inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None) -> torch.Tensor:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv
    kind = scaling["rope_type"]
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"rope scaling {kind!r} is not supported; supported: linear, llama3")


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
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64),
                            _inv_freq(head_dim, theta, scaling))  # fmt: skip
        emb = torch.cat([freqs, freqs], dim=-1)
        sign = torch.cat([-torch.ones_like(freqs), torch.ones_like(freqs)], dim=-1)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", (emb.sin() * sign).float(), persistent=False)
        # runtime/native.py's library once a float32 CPU model is loaded (elementwise.c)
        self.native: ctypes.CDLL | None = None

    def forward(self, positions: torch.Tensor) -> Rope:
        # Indexing gives fresh contiguous rows, as the C path reads them.
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        return Rope(cos, sin, self.native)
