"""Linear layers whose parameters carry their own `weight_loader`.

Checkpoints store q/k/v and gate/up as separate tensors; we run them fused (one matmul). The
loader of a fused parameter copies each checkpoint tensor into its shard of rows; tensor
parallelism will slice here too, next to the layer that needs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def copy_loader(param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
    if loaded.shape != param.shape:
        raise ValueError(
            f"checkpoint tensor {tuple(loaded.shape)} != parameter {tuple(param.shape)}"
        )
    param.data.copy_(loaded)


def set_loader(param: nn.Parameter, loader: object) -> None:
    param.weight_loader = loader  # type: ignore[attr-defined]


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        for p in self.parameters():
            set_loader(p, copy_loader)


class MergedLinear(nn.Linear):
    """Several projections of the same input as one matmul; `shards` names their row blocks."""

    def __init__(
        self, in_features: int, sizes: Sequence[int], shards: Sequence[str], bias: bool
    ) -> None:
        super().__init__(in_features, sum(sizes), bias=bias)
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.rows = {
            name: (off, size) for name, off, size in zip(shards, offsets, sizes, strict=True)
        }
        for p in self.parameters():
            set_loader(p, self._load_shard)

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
        if shard is None:
            raise ValueError("a merged projection is loaded one shard at a time")
        offset, size = self.rows[shard]
        copy_loader(nn.Parameter(param.data.narrow(0, offset, size)), loaded)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(x, [size for _, size in self.rows.values()], dim=-1))
