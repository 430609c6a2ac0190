"""Linear layers whose parameters carry their own `weight_loader` (see weight_loader.py).

Checkpoints store q/k/v and gate/up as separate tensors; we run each group fused, one matmul.
The loader of a fused parameter copies each checkpoint tensor into its own block of rows;
tensor parallelism will slice here too, next to the layer that needs it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from runtime.layers.weight_loader import set_weight_loader


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        set_weight_loader(self)


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
