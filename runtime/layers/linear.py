"""Linear layers whose parameters carry their own `weight_loader` (see weight_loader.py).

Checkpoints store q/k/v and gate/up as separate tensors; we run each group fused, one matmul.
The loader of a fused parameter copies each checkpoint tensor into its own block of rows;
tensor parallelism will slice here too, next to the layer that needs it. After loading, a
weight may be swapped for a quantised one (see runtime/quantization.py); the layer keeps its
bias and its shape, so the model does not know.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.layers.weight_loader import set_weight_loader


class LinearBase(nn.Linear):
    """nn.Linear whose float weight can be replaced, once loaded, by a module computing
    x @ W.T from a quantised form of it."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.quantized: nn.Module | None = None

    def set_quantized(self, weight: nn.Module) -> None:
        """From now on `weight` computes the matmul; the float weight is dropped (not kept
        beside it), so the model holds only the quantised bytes."""
        self.quantized = weight
        self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is None:
            return F.linear(x, self.weight, self.bias)
        out: torch.Tensor = self.quantized(x)
        return out if self.bias is None else out + self.bias


class Linear(LinearBase):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        set_weight_loader(self)


class MergedLinear(LinearBase):
    """Several projections of the same input as one matmul; `shards` names their row blocks."""

    def __init__(
        self, in_features: int, sizes: Sequence[int], shards: Sequence[str], bias: bool
    ) -> None:
        super().__init__(in_features, sum(sizes), bias=bias)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.rows = {
            name: (off, size) for name, off, size in zip(shards, offsets, sizes, strict=True)
        }
        set_weight_loader(self, self._load_shard)

    def _load_shard(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None
    ) -> None:
        if shard_id not in self.rows:
            raise ValueError(f"shard {shard_id!r}: expected one of {', '.join(self.rows)}")
        offset, size = self.rows[shard_id]
        rows = param.data.narrow(0, offset, size)
        if loaded.shape != rows.shape:
            raise ValueError(
                f"checkpoint tensor {tuple(loaded.shape)} != shard {shard_id!r} {tuple(rows.shape)}"
            )
        rows.copy_(loaded)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(x, [size for _, size in self.rows.values()], dim=-1))
