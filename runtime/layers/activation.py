"""The gated activations: SiLU-and-multiply (the Llama MLP), clamped SwiGLU (GPT-OSS's
experts). Both take [..., 2 * d], gate columns then up columns, and give [..., d]."""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from runtime.native import float32_rows


class SiluAndMul(nn.Module):
    """[..., 2 * d] (gate rows, then up rows, as the fused gate_up projection lays them out)
    -> [..., d]."""

    def __init__(self) -> None:
        super().__init__()
        # runtime/native.py's library once a float32 CPU model is loaded (elementwise.c)
        self.native: ctypes.CDLL | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is None:
            gate, up = x.chunk(2, dim=-1)
            return F.silu(gate) * up
        # silu_and_mul_f32 takes no row stride: rows adjacent too
        flat = float32_rows(x, "the C SiLU-and-multiply").contiguous()
        d = flat.shape[1] // 2
        out = torch.empty(flat.shape[0], d)
        self.native.silu_and_mul_f32(flat.data_ptr(), flat.shape[0], d, out.data_ptr(),
                                     torch.get_num_threads())  # fmt: skip
        return out.view(*x.shape[:-1], d)


class ClampedSwiGLU(nn.Module):
    """GPT-OSS's: gate clamped above at `limit`, up to [-limit, limit], then
    (up + 1) * gate * sigmoid(alpha * gate)."""

    def __init__(self, alpha: float, limit: float) -> None:
        super().__init__()
        self.alpha, self.limit = alpha, limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(-self.limit, self.limit)
        return (up + 1) * gate * torch.sigmoid(gate * self.alpha)
