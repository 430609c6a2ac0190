"""RMSNorm, computed in float32 as the reference implementations do, with the residual add
fused in when given one (vLLM's fused_add_rms_norm): the decoder passes its residual stream
through the norms instead of adding it itself."""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from runtime.layers.weight_loader import set_weight_loader
from runtime.native import float32_rows


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        set_weight_loader(self)
        # runtime/native.py's library once a float32 CPU model is loaded (elementwise.c)
        self.native: ctypes.CDLL | None = None

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm(x) * weight; with a residual, (RMSNorm(x + residual) * weight, x + residual),
        the sum being the next residual (the residual tensor may be updated in place)."""
        if self.native is not None:
            return self._native(x, residual)
        if residual is not None:
            x = residual = x + residual
        h = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        out = (self.weight * h.to(x.dtype)).to(x.dtype)
        return out if residual is None else (out, residual)

    def _native(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        assert self.native is not None
        width = x.shape[-1]
        flat = float32_rows(x, "the C RMSNorm")
        if residual is not None and not residual.is_contiguous():
            residual = residual.contiguous()
        out = torch.empty(flat.shape[0], width)
        self.native.rms_norm_f32(
            flat.data_ptr(), flat.shape[0], width, flat.stride(0),
            None if residual is None else residual.data_ptr(), self.weight.data_ptr(),
            self.eps, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        normed = out if x.dim() == 2 else out.view(x.shape)
        return normed if residual is None else (normed, residual)
