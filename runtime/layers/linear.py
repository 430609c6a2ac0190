"""Linear layers whose parameters carry their own `weight_loader` (see weight_loader.py).

Checkpoints store q/k/v and gate/up as separate tensors; we run each group fused, one matmul.
The loader of a fused parameter copies each checkpoint tensor into its own block of rows.
Under tensor parallelism (Megatron's split) the fused projections are column-parallel and
o_proj / down_proj row-parallel, so each attention and each MLP costs one all-reduce; every
loader narrows the checkpoint tensor to its rank's slice. After loading, a weight may be
swapped for another form of it: quantised (see runtime/quantization.py; each rank quantises its
own slice) or, for float32 on the CPU, packed for a C kernel (PanelWeight). The layer keeps
its bias and its shape, so the model does not know.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from runtime.layers.weight_loader import copy_weight, set_param_loader, set_weight_loader
from runtime.native import float32_rows, load_kernels
from runtime.parallel import SINGLE, TensorParallel

PANEL = 16  # output columns a panel: panel_gemm.c's PANEL


class ReplaceableWeight(nn.Module):
    """A module whose float `weight` [out, in] can be replaced, once loaded, by a module
    computing x @ W.T from another form of it. Each user sets `self.matmul = None` at init;
    one whose weight is another module's too (a tied LM head) sets `shares_weight`, and keeps
    it: replacing it would leave the other module a copy to hold."""

    weight: torch.Tensor  # None once replaced (nn.Linear declares it so)
    matmul: nn.Module | None
    shares_weight = False

    def set_matmul(self, matmul: nn.Module) -> None:
        """From now on `matmul` computes x @ W.T; the float weight is dropped (not kept beside
        it), so the model holds only the new form's bytes."""
        self.matmul = matmul
        self.register_parameter("weight", None)

    def project(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T (+ bias), from whichever form W has."""
        if self.matmul is None:
            return F.linear(x, self.weight, bias)
        out: torch.Tensor = self.matmul(x)
        return out if bias is None else out + bias


class LinearBase(nn.Linear, ReplaceableWeight):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.matmul = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, self.bias)


def to_panels(weight: torch.Tensor) -> torch.Tensor:
    """W [out, in] (any dtype) as panel_gemm.c reads it: [ceil(out / 16), in, 16], the last
    panel's missing rows zero."""
    out, width = weight.shape
    padded = torch.zeros(-(-out // PANEL) * PANEL, width, dtype=weight.dtype)
    padded[:out] = weight.detach()
    return padded.view(-1, PANEL, width).transpose(1, 2).contiguous()


def panel_matmul(x: torch.Tensor, out_features: int, gemm: Any, *weights: int) -> torch.Tensor:
    """x @ W.T by `gemm`, an entry point of panel_gemm.c, W given as the data pointers
    `weights` (its panels, then the int8 scales). Called 4 times a layer per step: kept to the
    checks that guard the raw pointers (~10 us a call in all)."""
    flat = float32_rows(x, "the panel kernels")
    rows = flat.shape[0]
    out = torch.empty(rows, out_features)
    if rows:
        gemm(flat.data_ptr(), rows, flat.shape[1], flat.stride(0), *weights, out_features,
             out.data_ptr(), torch.get_num_threads())  # fmt: skip
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out_features)


class PanelWeight(nn.Module):
    """W packed for runtime/csrc/panel_gemm.c (to_panels), float32 on the CPU. Its
    register-blocked kernel computes x @ W.T 3-6x faster than torch's MKL call at decode's few
    rows, 1.7-2x at 32 and no slower at prefill's thousands, because MKL repacks W on every
    call (benchmarks/cpu_matmul.py)."""

    kernel_name = "panel-gemm"  # what ModelRunner.kernels() reports

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise TypeError(f"PanelWeight packs float32 CPU weights, not {weight.dtype} on "
                            f"{weight.device}")  # fmt: skip
        self.out_features = weight.shape[0]
        self.panels = nn.Parameter(to_panels(weight), requires_grad=False)
        self._gemm = load_kernels().panel_gemm_f32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return panel_matmul(x, self.out_features, self._gemm, self.panels.data_ptr())


def pack_weights(model: nn.Module) -> int:
    """Give every float32 linear layer of a CPU model, and its LM head unless tied, a
    PanelWeight. Returns how many it changed; raises KernelUnavailableError (naming the cause)
    where the kernel cannot be built, leaving the model as it was."""
    load_kernels()
    layers = [m for m in model.modules()
              if isinstance(m, ReplaceableWeight) and not m.shares_weight]  # fmt: skip
    for layer in layers:
        layer.set_matmul(PanelWeight(layer.weight))
    return len(layers)


class RowParallelLinear(LinearBase):
    """Each rank holds a slice of the input columns and computes a partial x @ W.T over its
    slice of x (the column-parallel layer before it left x split the same way); the sum over
    ranks is the output. A bias (GPT-OSS's o_proj has one; Llama's o_proj and down_proj do
    not) is whole on every rank and added once, after the sum."""

    def __init__(
        self, in_features: int, out_features: int, tp: TensorParallel = SINGLE, bias: bool = False
    ) -> None:
        super().__init__(in_features // tp.size, out_features, bias=bias)
        self.tp = tp
        set_weight_loader(self, self._load, (out_features, in_features))
        if self.bias is not None:
            set_param_loader(self.bias, copy_weight)

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        start, length = self.tp.slice_of(loaded.shape[1])
        copy_weight(param, loaded.narrow(1, start, length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(self.project(x))
        return out if self.bias is None else out + self.bias


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
