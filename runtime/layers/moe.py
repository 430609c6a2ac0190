"""GPT-OSS's mixture-of-experts MLP: a router picks `top_k` experts per token, each a clamped
SwiGLU with biases, and the token's output is their sum weighted by the softmax of the picked
router logits.

Tensor parallelism splits every expert the way the dense MLP is split (vLLM's MoE under
tensor parallelism): rank r holds columns [r * I/N, (r + 1) * I/N) of each expert's gate and
up projections and the matching columns of its down projection, so every rank runs the experts
the router picks on its slice and one all-reduce per layer sums them. The router is small and
replicated; every rank sees the same hidden states (they come out of an all-reduce), so all
route alike. Expert parallelism (whole experts per rank) is not built.

Checkpoint layouts (transformers' GptOssExperts): gate_up_proj [E, hidden, 2I] with gate and
up columns interleaved (gate at even, up at odd), down_proj [E, I, hidden], both multiplied as
x @ W. The loaders turn them into this module's [E, out, in] rows (gate rows, then up rows),
as the dense layers hold theirs, and cut this rank's slice. OpenAI's released checkpoints
store the two expert weights in MXFP4 instead (layers/mxfp4.py), with rows as the float
layout's columns. A float model dequantises them at load. Built with `mxfp4=True`
(`--quantization mxfp4`), the layer holds both weights as MXFP4 blocks and scales from the
start, never float: an MXFP4 checkpoint's bytes are copied (this rank's rows or groups of
them), and a float weight (a float checkpoint, dummy weights) is quantised one expert at a
time as it loads, so loading holds one layer's float weight at most (the tensor being
loaded) beside the model, never the float model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import ModelConfig
from runtime.layers import mxfp4
from runtime.layers.activation import ClampedSwiGLU
from runtime.layers.linear import panel_matmul, to_panels
from runtime.layers.mxfp4 import GROUP as MXFP4_GROUP
from runtime.layers.weight_loader import (
    copy_weight,
    set_float_loader,
    set_param_loader,
    set_weight_loader,
)
from runtime.native import load_kernels
from runtime.parallel import SINGLE, TensorParallel


def _expect(loaded: torch.Tensor, shape: tuple[int, ...], name: str) -> None:
    if tuple(loaded.shape) != shape:
        raise ValueError(f"checkpoint tensor {tuple(loaded.shape)} != {name} {shape}")


def check_mxfp4_groups(cfg: ModelConfig, ranks: int) -> None:
    """Raises unless every row of every expert's two weights on each of `ranks` ranks is
    whole MXFP4 groups, as holding them in MXFP4 needs."""
    columns = cfg.intermediate_size // ranks
    if columns % MXFP4_GROUP:
        raise ValueError(
            f"quantization mxfp4 groups {MXFP4_GROUP} input values of each expert's down "
            f"projection: intermediate_size / tensor_parallel_size ({columns}) must be a "
            f"multiple of {MXFP4_GROUP}"
        )
    if cfg.hidden_size % MXFP4_GROUP:
        raise ValueError(
            f"quantization mxfp4 groups {MXFP4_GROUP} input values of each expert's gate_up "
            f"projection: hidden_size ({cfg.hidden_size}) must be a multiple of {MXFP4_GROUP}"
        )


class Experts(nn.Module):
    """Every expert's weights, this rank's columns of them; `forward` runs the routed ones."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel, mxfp4: bool = False) -> None:
        super().__init__()
        assert cfg.moe is not None
        experts, hidden = cfg.moe.num_experts, cfg.hidden_size
        self.hidden, self.intermediate, self.tp = hidden, cfg.intermediate_size, tp
        local = cfg.intermediate_size // tp.size
        self.num_experts = experts
        # The checkpoint's float layouts, which the float loaders take.
        gate_up_shape = (experts, hidden, 2 * self.intermediate)
        down_shape = (experts, self.intermediate, hidden)
        # Left uninitialised: every parameter is filled by a loader (checkpoint or dummy).
        if mxfp4:
            check_mxfp4_groups(cfg, tp.size)
            gate_up = self._mxfp4_parameters("gate_up_proj", 2 * local, hidden)
            down = self._mxfp4_parameters("down_proj", hidden, local)
            for part in gate_up:
                set_param_loader(part, self._load_gate_up_rows)
            for part in down:
                set_param_loader(part, self._load_down_groups)
            set_float_loader(gate_up[0], self._quantize_gate_up, gate_up_shape)
            set_float_loader(down[0], self._quantize_down, down_shape)
        else:
            self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * local, hidden))
            self.down_proj = nn.Parameter(torch.empty(experts, hidden, local))
            set_param_loader(self.gate_up_proj, self._load_gate_up, gate_up_shape)
            set_param_loader(self.down_proj, self._load_down, down_shape)
        self.gate_up_proj_bias = nn.Parameter(torch.empty(experts, 2 * local))
        # Whole on every rank, added once after the all-reduce (MoE.forward).
        self.down_proj_bias = nn.Parameter(torch.empty(experts, hidden))
        set_param_loader(self.gate_up_proj_bias, self._load_gate_up_bias,
                         (experts, 2 * self.intermediate))  # fmt: skip
        set_param_loader(self.down_proj_bias, copy_weight)
        self.act = ClampedSwiGLU(cfg.moe.swiglu_alpha, cfg.moe.swiglu_limit)
        # moe_triton.fused_experts once a CUDA model is loaded where Triton runs: the same sum
        # in a fixed number of kernels, with no host synchronisation.
        self.fused: Callable[..., torch.Tensor] | None = None
        self._gemm: Any = None  # panel_gemm.c's entry point once `pack`ed
        self.mxfp4 = mxfp4  # the weights held as MXFP4 blocks and scales

    def _mxfp4_parameters(self, name: str, rows: int, k: int) -> list[nn.Parameter]:
        """Weight `name` [experts, rows, k] as MXFP4 parameters `{name}_blocks`, `_scales`."""
        groups = (self.num_experts, rows, k // MXFP4_GROUP)
        blocks = torch.empty(*groups, MXFP4_GROUP // 2, dtype=torch.uint8)
        return self._replace(name, blocks=blocks, scales=torch.empty(groups, dtype=torch.uint8))

    def pack(self) -> None:
        """For float32 on the CPU: each expert's two weights as panel_gemm.c's panels (as
        layers/linear.py's PanelWeight), the float ones dropped. An expert gets few rows in
        decode (tokens x top_k / experts), where torch's matmul spends most of its time
        repacking the weight: a moe4 MoE layer over 32 decoding tokens runs 1.3-1.6x faster
        packed (docs/perf.md). Raises KernelUnavailableError where the kernel cannot be
        built."""
        gemm = load_kernels().panel_gemm_f32
        for name in ("gate_up_proj", "down_proj"):
            self._replace(name, panels=torch.stack([to_panels(w) for w in getattr(self, name)]))
        self._gemm = gemm

    def _replace(self, name: str, **forms: torch.Tensor) -> list[nn.Parameter]:
        """Hold weight `name` in another form, as parameters `{name}_{form}` (a float one
        dropped); returns them."""
        self.register_parameter(name, None)
        params = [nn.Parameter(value, requires_grad=False) for value in forms.values()]
        for form, param in zip(forms, params, strict=True):
            self.register_parameter(f"{name}_{form}", param)
        return params

    @property
    def packed(self) -> bool:
        return self._gemm is not None

    def _project(
        self, name: str, expert: int, a: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """a @ W.T (+ bias) for expert `expert`'s weight `name`, in whichever form it is held."""
        if self.mxfp4:  # this expert's weight dequantised for the one call (torch has no FP4)
            weight = mxfp4.dequantize(getattr(self, f"{name}_blocks")[expert],
                                      getattr(self, f"{name}_scales")[expert], a.dtype)  # fmt: skip
            return F.linear(a, weight, bias)
        if self._gemm is None:
            return F.linear(a, getattr(self, name)[expert], bias)
        # The output width is the bias's (down's bias is added later, in MoE.forward).
        width = getattr(self, f"{name}_bias").shape[1]
        panels = getattr(self, f"{name}_panels")[expert]
        out = panel_matmul(a, width, self._gemm, panels.data_ptr())
        return out if bias is None else out + bias

    def _gate_up_rows(self, interleaved: torch.Tensor) -> torch.Tensor:
        """[E, 2I, ...] with gate and up rows interleaved (gate at even) -> this rank's
        [E, 2I/N, ...]: its gate rows, then its up rows."""
        start, length = self.tp.slice_of(self.intermediate)
        gate, up = interleaved[:, 0::2], interleaved[:, 1::2]
        return torch.cat([gate[:, start : start + length], up[:, start : start + length]], 1)

    def _down_columns(self, loaded: torch.Tensor, unit: int = 1) -> torch.Tensor:
        """[E, hidden, I / unit, ...] -> this rank's [E, hidden, I/N / unit, ...]."""
        start, length = self.tp.slice_of(self.intermediate)
        return loaded.narrow(2, start // unit, length // unit)

    def _load_gate_up(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
        experts, _, hidden = param.shape
        _expect(loaded, (experts, hidden, 2 * self.intermediate), "gate_up_proj")
        param.data.copy_(self._gate_up_rows(loaded.transpose(1, 2)))

    def _load_gate_up_bias(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None
    ) -> None:
        _expect(loaded, (param.shape[0], 2 * self.intermediate), "gate_up_proj_bias")
        param.data.copy_(self._gate_up_rows(loaded))

    def _load_down(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
        experts, hidden, _ = param.shape
        _expect(loaded, (experts, self.intermediate, hidden), "down_proj")
        param.data.copy_(self._down_columns(loaded.transpose(1, 2)))

    def _load_gate_up_rows(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None
    ) -> None:
        """An MXFP4 checkpoint's gate_up_proj blocks or scales: groups run along the hidden
        input, which no rank cuts, so this rank's rows are its bytes."""
        shape = (param.shape[0], 2 * self.intermediate, *param.shape[2:])
        _expect(loaded, shape, "MXFP4 gate_up_proj")
        param.data.copy_(self._gate_up_rows(loaded))

    def _load_down_groups(
        self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None
    ) -> None:
        """An MXFP4 checkpoint's down_proj blocks or scales: groups run along the intermediate
        input, which ranks cut into whole groups (loader.py checks)."""
        experts, hidden, groups = param.shape[:3]
        shape = (experts, hidden, groups * self.tp.size, *param.shape[3:])
        _expect(loaded, shape, "MXFP4 down_proj")
        param.data.copy_(self._down_columns(loaded, MXFP4_GROUP))

    def _quantize_into(self, name: str, expert: int, weight: torch.Tensor) -> None:
        blocks = getattr(self, f"{name}_blocks")
        blocks.data[expert], getattr(self, f"{name}_scales").data[expert] = mxfp4.quantize(
            weight.to(blocks.device)
        )

    def _quantize_gate_up(self, loaded: torch.Tensor) -> None:
        """A float gate_up_proj (checkpoint layout) into MXFP4, one expert at a time."""
        _expect(loaded, (self.num_experts, self.hidden, 2 * self.intermediate), "gate_up_proj")
        for e in range(self.num_experts):
            self._quantize_into("gate_up_proj", e, self._gate_up_rows(loaded[e : e + 1].mT)[0])

    def _quantize_down(self, loaded: torch.Tensor) -> None:
        _expect(loaded, (self.num_experts, self.intermediate, self.hidden), "down_proj")
        for e in range(self.num_experts):
            self._quantize_into("down_proj", e, self._down_columns(loaded[e : e + 1].mT)[0])

    def forward(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """This rank's partial sum over each token's experts [tokens, top_k] (weights
        [tokens, top_k]) of x [tokens, hidden], without the down bias.

        Tokens are grouped by expert, so each routed expert is two matmuls over all its
        tokens, as vLLM's fused MoE groups them. Here the group sizes come to the host (one
        synchronisation a layer), so this path cannot be captured in a CUDA graph; the fused
        one can."""
        if self.fused is not None and self.mxfp4:
            return self.fused(x, experts, weights, self.gate_up_proj_blocks,
                              self.gate_up_proj_scales, self.gate_up_proj_bias,
                              self.down_proj_blocks, self.down_proj_scales, self.act)  # fmt: skip
        if self.fused is not None:
            return self.fused(x, experts, weights, self.gate_up_proj, self.gate_up_proj_bias,
                              self.down_proj, self.act)  # fmt: skip
        top_k = experts.shape[1]
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.down_proj_bias.shape[0]).tolist()
        tokens = order // top_k
        # Every assignment's rows in expert order: one gather, one activation and one scatter
        # a layer, and per routed expert only its two matmuls (per-expert small operators
        # cost more than the matmuls at decode's few rows an expert).
        rows = x[tokens]
        h = x.new_empty(len(tokens), self.gate_up_proj_bias.shape[1])
        starts = itertools.accumulate(counts[:-1], initial=0)  # where each expert's rows begin
        spans = [(e, at, n) for e, (at, n) in enumerate(zip(starts, counts, strict=True)) if n]
        for expert, start, n in spans:
            h[start : start + n] = self._project("gate_up_proj", expert, rows[start : start + n],
                                                 self.gate_up_proj_bias[expert])  # fmt: skip
        act = self.act(h)
        y = torch.empty_like(rows)
        for expert, start, n in spans:
            y[start : start + n] = self._project("down_proj", expert, act[start : start + n])
        scale = weights.flatten()[order].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, y * scale[:, None])


class MoE(nn.Module):
    """The MLP of a GPT-OSS layer, named as its checkpoint names it (mlp.router, mlp.experts)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE, mxfp4: bool = False) -> None:
        super().__init__()
        assert cfg.moe is not None
        self.top_k, self.tp = cfg.moe.top_k, tp
        # A plain nn.Linear, so neither quantisation nor weight packing touches it: a rounded
        # router logit can pick another expert (vLLM keeps the gate float too).
        self.router = nn.Linear(cfg.hidden_size, cfg.moe.num_experts, bias=True)
        set_weight_loader(self.router)
        self.experts = Experts(cfg, tp, mxfp4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        top, experts = torch.topk(logits, self.top_k, dim=-1)
        weights = torch.softmax(top.float(), dim=-1)  # [tokens, top_k]
        out = self.tp.all_reduce(self.experts(x, experts, weights))
        bias = (weights[..., None] * self.experts.down_proj_bias[experts].float()).sum(1)
        return out + bias.to(out.dtype)
