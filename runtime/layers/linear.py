"""Linear layers whose parameters carry their own `weight_loader` (see weight_loader.py).

Checkpoints store q/k/v and gate/up as separate tensors; we run each group fused, one matmul.
The loader of a fused parameter copies each checkpoint tensor into its own block of rows.
Under tensor parallelism (Megatron's split) the fused projections are column-parallel and
o_proj / down_proj row-parallel, so each attention and each MLP costs one all-reduce; every
loader narrows the checkpoint tensor to its rank's slice. After loading, a weight may be
swapped for a quantised one (see runtime/quantization.py; each rank quantises its own slice);
the layer keeps its bias and its shape, so the model does not know.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from runtime.layers.weight_loader import copy_weight, set_weight_loader
from runtime.parallel import SINGLE, TensorParallel


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


class RowParallelLinear(LinearBase):
    """Each rank holds a slice of the input columns and computes a partial x @ W.T over its
    slice of x (the column-parallel layer before it left x split the same way); the sum over
    ranks is the output. No bias: it would be added once per rank (Llama's o_proj and
    down_proj have none)."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__(in_features // tp.size, out_features, bias=False)
        self.tp = tp
        set_weight_loader(self, self._load, (out_features, in_features))

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        start, length = self.tp.slice_of(loaded.shape[1])
        copy_weight(param, loaded.narrow(1, start, length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x))


class MergedLinear(LinearBase):
    """Several projections of the same input as one matmul; `shards` names their row blocks.

    Column-parallel: each rank holds a slice of every projection's rows (its heads, its
    columns of the MLP), so its output is its own slice and needs no communication. `sizes`
    are the projections' logical rows; `parts` cuts each into that many distinct slices
    (default: one per rank). A projection with fewer heads than ranks (K/V under wide GQA)
    has parts = its heads, and rank r holds slice r * parts // ranks: replicated, each copy
    on the ranks whose query heads read it.
    """

    def __init__(
        self,
        in_features: int,
        sizes: Sequence[int],
        shards: Sequence[str],
        bias: bool,
        tp: TensorParallel = SINGLE,
        parts: Sequence[int] | None = None,
    ) -> None:
        parts = parts or [tp.size] * len(sizes)
        local = [size // n for size, n in zip(sizes, parts, strict=True)]
        super().__init__(in_features, sum(local), bias=bias)
        offsets = [sum(local[:i]) for i in range(len(local))]
        # shard id -> (first row here, rows here, index of the slice this rank holds)
        self.rows = {
            name: (off, size, tp.rank * n // tp.size)
            for name, off, size, n in zip(shards, offsets, local, parts, strict=True)
        }
        self.logical_sizes = dict(zip(shards, sizes, strict=True))
        set_weight_loader(self, self._load_shard, (sum(sizes), in_features))

    def _load_shard(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None
    ) -> None:
        if shard_id is None:  # the whole fused tensor (dummy weights): its projections in order
            for name, piece in zip(
                self.rows, torch.split(loaded, list(self.logical_sizes.values())), strict=True
            ):
                self._load_shard(param, piece, name)
            return
        if shard_id not in self.rows:
            raise ValueError(f"shard {shard_id!r}: expected one of {', '.join(self.rows)}")
        offset, size, index = self.rows[shard_id]
        rows = param.data.narrow(0, offset, size)
        expected = (self.logical_sizes[shard_id], *rows.shape[1:])
        if loaded.shape != expected:
            raise ValueError(
                f"checkpoint tensor {tuple(loaded.shape)} != shard {shard_id!r} {expected}"
            )
        rows.copy_(loaded.narrow(0, index * size, size))

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(x, [size for _, size, _ in self.rows.values()], dim=-1))
