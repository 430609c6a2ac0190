"""Weight-only quantisation of the linear layers: int8 per output channel, int4 per group.

Weights load in float through the normal weight loaders; `quantize` then converts every
`LinearBase` (qkv_proj, o_proj, gate_up_proj, down_proj) in place. Activations, biases, norms,
the embedding and the LM head stay float. The LM head stays float because, tied, it *is* the
embedding (quantising it would keep the float copy too, saving nothing), and because its
output is the logits themselves: an error there moves the argmax directly, with no later layer
to average it out (vLLM's AWQ/GPTQ keep it float by default for the same reason).

Two ways to multiply, chosen per call by the number of rows (tokens):
- up to KERNEL_MAX_ROWS (decode of a few sequences): torch's CPU weight-only kernels, which
  read the quantised weight as stored: `torch._weight_int8pack_mm` and
  `aten._weight_int4pack_mm_for_cpu` (two int4 values a byte).
- more rows (prefill, large batches): dequantise the weight to float once and run a dense
  matmul. The kernels are matrix-vector loops whose time grows linearly with the rows, so past
  a few rows one dequantisation (O(out * in)) amortised over all of them wins by 10x and more.
On a CPU without AVX-512 VNNI neither path beats a float matmul: these builds save memory, not
time. benchmarks/quant_matmul.py measures both paths against float.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from runtime.layers.linear import PANEL, LinearBase, panel_matmul, to_panels
from runtime.native import load_kernels

# Rows up to which the weight-only kernels beat dequantise-then-matmul (benchmarks/quant_matmul.py).
KERNEL_MAX_ROWS = 4
# Group size of int4 scales: 128, as GPTQ/AWQ checkpoints use. A row narrower than
# INT4_SMALL_INPUT gets groups of INT4_SMALL_GROUP_SIZE instead, so it still has at least 8
# groups: with two groups a row, one outlier would coarsen half the row's weights.
INT4_GROUP_SIZE = 128
INT4_SMALL_GROUP_SIZE = 32
INT4_SMALL_INPUT = 1024


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per output row: q = round(w / scale) in [-127, 127], scale = max|w| / 127.
    Returns (q int8 [out, in], scale float32 [out])."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127
    scale = torch.where(scale == 0, 1.0, scale)  # an all-zero row: q = 0 is exact at any scale
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def int4_group_size(in_features: int) -> int:
    return INT4_GROUP_SIZE if in_features >= INT4_SMALL_INPUT else INT4_SMALL_GROUP_SIZE


def quantize_int4(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per group of `group_size` inputs: w ~ q * scale + low, q in [0, 15], so all
    16 levels span each group's own [min, max]. Returns (q int32 [out, in] unpacked,
    scale and low float32 [out, in // group_size])."""
    out, width = weight.shape
    w = weight.detach().float().view(out, width // group_size, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = (high - low) / 15
    scale = torch.where(scale == 0, 1.0, scale)  # a constant group: q = 0 and low is exact
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(out, width), scale, low


def dequantize_int4(
    q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group_size: int
) -> torch.Tensor:
    out, width = q.shape
    w = q.float().view(out, -1, group_size) * scale[..., None] + low[..., None]
    return w.view(out, width)


@functools.cache
def _int4_pack_order() -> tuple[int, torch.Tensor]:
    """How aten's CPU int4 packing lays out rows, found by packing a probe (the layout follows
    the CPU's vector width: blocks of 64 rows on AVX-512, 32 on AVX2 and plain builds).

    Invariant assumed, and checked on every packed weight (Int4Weight): a block of B rows is
    stored as [in, B/2] bytes, each byte two rows' values at one input, low nibble first.
    Returns B and the row within the block of each nibble of one input, in storage order."""
    probe = 64  # a multiple of every block size
    rows = torch.arange(probe, dtype=torch.int32)[:, None].expand(probe, 2)
    digits = []
    for digit in (rows % 16, rows // 16):
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit.contiguous(), 1)
        digits.append(torch.stack([packed & 15, packed >> 4], dim=-1).flatten().long())
    row = digits[0] + 16 * digits[1]  # the row each stored nibble came from
    for block in (64, 32, 16):
        offsets = torch.arange(0, probe, block)[:, None, None]
        order = row.view(probe // block, 2, block) - offsets
        if bool((order == order[0, 0]).all()):
            return block, order[0, 0]
    raise RuntimeError(
        "this torch build packs int4 weights in a layout runtime/quantization.py cannot read; "
        "use --quantization int8"
    )


class Int8Weight(nn.Module):
    """A linear layer's weight as int8 [out, in] and one scale per output row (the scale in the
    model's dtype, as the kernel wants it)."""

    kernel_name = "int8"  # what ModelRunner.kernels() reports

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        q, scale = quantize_int8(weight)
        self.qweight = nn.Parameter(q, requires_grad=False)
        self.scale = nn.Parameter(scale.to(weight.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= KERNEL_MAX_ROWS:
            out = torch._weight_int8pack_mm(flat, self.qweight, self.scale)
        else:  # the scale is per output column of x @ q.T, so it applies after the matmul
            out = F.linear(flat, self.qweight.to(x.dtype)) * self.scale
        return out.view(*x.shape[:-1], out.shape[-1])


class Int8PanelWeight(nn.Module):
    """An Int8Weight repacked for runtime/csrc/panel_gemm.c on a float32 CPU model: int8
    panels (linear.py's to_panels) and the scales padded to whole panels. The kernel converts
    each int8 weight to float as it reads it and scales the sums, so at decode's few rows,
    where the matmul is bound by reading the weights, it reads a quarter of the float32
    panels' bytes (benchmarks/quant_matmul.py)."""

    kernel_name = "int8-panel-gemm"  # what ModelRunner.kernels() reports

    def __init__(self, weight: Int8Weight) -> None:
        super().__init__()
        self.out_features = weight.qweight.shape[0]
        panels = to_panels(weight.qweight)
        scales = torch.zeros(panels.shape[0] * PANEL)
        scales[: self.out_features] = weight.scale.float()
        self.panels = nn.Parameter(panels, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self._gemm = load_kernels().panel_gemm_i8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return panel_matmul(x, self.out_features, self._gemm, self.panels.data_ptr(),
                            self.scales.data_ptr())  # fmt: skip


class Int4Weight(nn.Module):
    """A linear layer's weight as int4, two a byte in the CPU kernel's layout, with a scale and
    a zero per group of inputs.

    aten packs whole blocks of rows in one layout (_int4_pack_order) but a last, partial block
    in another, and refuses a weight whose rows are not a multiple of 16. So the weight is
    padded with zero rows to a whole block: `packed` is [padded_out, in / 2], the padding rows'
    scales and zeros are 0 (they compute 0), and every output drops them: forward, unpack and
    dequantize return out_features rows."""

    kernel_name = "int4"  # what ModelRunner.kernels() reports

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        out, width = weight.shape
        self.out_features = out
        self.group_size = int4_group_size(width)
        self.block, order = _int4_pack_order()
        self.storage_of_row = torch.argsort(order)  # where each row of a block is stored
        if width % self.group_size:
            raise ValueError(
                f"int4: a weight [{out}, {width}] needs in_features divisible by its group size "
                f"{self.group_size}; use int8 for this model"
            )
        q, scale, low = quantize_int4(weight, self.group_size)
        padding = -out % self.block
        q, scale, low = (F.pad(t, (0, 0, 0, padding)) for t in (q, scale, low))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # The kernel computes w = (q - 8) * scale + zero, so zero = low + 8 * scale; it wants
        # them interleaved as [groups, padded_out, 2] in the activations' dtype.
        scales_and_zeros = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1)
        self.packed = nn.Parameter(packed, requires_grad=False)
        self.scales_and_zeros = nn.Parameter(
            scales_and_zeros.contiguous().to(weight.dtype), requires_grad=False
        )
        if not torch.equal(self._unpack_padded(), q.to(torch.uint8)):
            raise RuntimeError(
                "int4: aten's packed layout is not the one _int4_pack_order found; use int8"
            )

    def _unpack_padded(self) -> torch.Tensor:
        """The int4 values of every stored row, padding included, uint8 [padded_out, in], out
        of the kernel's layout (see _int4_pack_order). Every step stays in uint8: this runs on
        each many-row call, so passes cost time."""
        rows, width = self.packed.shape[0], self.packed.shape[1] * 2
        nibbles = torch.stack([self.packed & 15, self.packed >> 4], dim=-1)
        stored = nibbles.view(rows // self.block, width, self.block)
        by_row = stored.index_select(2, self.storage_of_row)  # [blocks, in, row in block]
        return by_row.transpose(1, 2).reshape(rows, width)

    def unpack(self) -> torch.Tensor:
        """The int4 values, uint8 [out, in]."""
        return self._unpack_padded()[: self.out_features]

    def dequantize(self) -> torch.Tensor:
        """The float weight [out, in]: (q - 8) * scale + zero, per group of inputs."""
        out, width = self.out_features, self.packed.shape[1] * 2
        scale, zero = self.scales_and_zeros[:, :out].transpose(0, 1).unbind(-1)  # [out, groups]
        w = self.unpack().to(scale.dtype).view(out, -1, self.group_size)
        return w.sub_(8).mul_(scale[..., None]).add_(zero[..., None]).view(out, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= KERNEL_MAX_ROWS:
            # The kernel reads rows densely: a view of a wider tensor must be copied.
            padded = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.contiguous(), self.packed, self.group_size, self.scales_and_zeros
            )
            out = padded[:, : self.out_features]
        else:
            out = F.linear(flat, self.dequantize().to(x.dtype))
        return out.reshape(*x.shape[:-1], self.out_features)  # type: ignore[no-any-return]


METHODS: dict[str, type[Int8Weight] | type[Int4Weight]] = {"int8": Int8Weight, "int4": Int4Weight}
# Of a mixture of experts' experts, held so from construction (layers/moe.py), not converted.
EXPERT_METHODS = ("mxfp4",)


def quantize(model: nn.Module, method: str) -> int:
    """Convert every linear layer's float weight to `method` (a key of METHODS), freeing the
    float one. Returns how many layers were converted."""
    layers = [m for m in model.modules() if isinstance(m, LinearBase)]
    for layer in layers:
        layer.set_matmul(METHODS[method](layer.weight))
    return len(layers)


def pack_int8_weights(model: nn.Module) -> int:
    """On a float32 CPU model, repack every Int8Weight as an Int8PanelWeight (dropping the
    unpacked copy). Returns how many; raises KernelUnavailableError where the kernel cannot be
    built, leaving the model as it was."""
    load_kernels()
    layers = [m for m in model.modules()
              if isinstance(m, LinearBase) and isinstance(m.matmul, Int8Weight)]  # fmt: skip
    for layer in layers:
        assert isinstance(layer.matmul, Int8Weight)
        layer.matmul = Int8PanelWeight(layer.matmul)
    return len(layers)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as held (quantised ones at their packed size)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
