"""The CPU float32 linear kernel (runtime/csrc/panel_gemm.c through PanelWeight) against
torch's matmul, and what the engine does when it cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.layers.linear import LinearBase, PanelWeight

# Rows around the kernel's blocks (6 rows) and chunks (48); outputs around its 16-wide panels;
# inputs from 1 to wider than a cache line, odd ones included.
ROWS = [1, 2, 5, 6, 7, 13, 47, 48, 49, 100]
SHAPES = [(1, 1), (15, 7), (16, 64), (17, 256), (40, 33), (100, 768)]  # (out, in)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    # float32 sums of up to 768 products in another order: a few ulps of the largest term
    return bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item()))


@pytest.mark.parametrize("out,width", SHAPES)
def test_panels_compute_what_torch_does(out: int, width: int) -> None:
    torch.manual_seed(out * 1000 + width)
    weight = torch.randn(out, width)
    packed = PanelWeight(weight)
    for rows in ROWS:
        x = torch.randn(rows, width)
        assert _close(packed(x), F.linear(x, weight)), (rows, out, width)


def test_inputs_of_any_layout_and_rank_are_read_right() -> None:
    torch.manual_seed(0)
    weight, wide = torch.randn(40, 24), torch.randn(9, 64)
    packed = PanelWeight(weight)
    columns = wide[:, 8:32]  # rows 64 floats apart, each dense
    transposed = torch.randn(24, 9).t()  # no dense rows: copied first
    batched = torch.randn(2, 3, 24)
    for x in (columns, transposed, batched):
        assert _close(packed(x), F.linear(x, weight))
    assert packed(torch.empty(0, 24)).shape == (0, 40)


def test_a_row_comes_out_the_same_whatever_the_batch_around_it() -> None:
    # Same FMAs in the same order for every row: the kernel is batch-invariant, bit for bit,
    # so a request's logits do not depend on who else is in the step.
    torch.manual_seed(0)
    packed = PanelWeight(torch.randn(48, 256))
    batch = torch.randn(60, 256)
    alone = torch.cat([packed(batch[i : i + 1]) for i in range(len(batch))])
    for rows in (2, 6, 7, 48, 60):
        assert torch.equal(packed(batch[:rows]), alone[:rows]), rows
    assert torch.equal(packed(batch[5:11]), alone[5:11])  # a row in another place of a block


def test_other_dtypes_are_refused_not_misread() -> None:
    with pytest.raises(TypeError, match="float32 CPU weights"):
        PanelWeight(torch.randn(16, 8, dtype=torch.bfloat16))
    packed = PanelWeight(torch.randn(16, 8))
    with pytest.raises(TypeError, match="float32 inputs"):
        packed(torch.randn(2, 8, dtype=torch.float64))


@pytest.mark.usefixtures("no_compiler")
def test_without_a_compiler_the_model_runs_torchs_operators_and_the_log_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="runtime.model_runner"):
        engine = Engine(EngineConfig(model="tiny", max_model_len=128, num_kv_blocks=32))
    layers = [m for m in engine.runner.model.modules() if isinstance(m, LinearBase)]
    assert layers and all(m.matmul is None and m.weight is not None for m in layers)
    assert "the model runs torch's operators" in caplog.text
    assert "no C compiler on PATH" in caplog.text
    # ... and says so to the harness, which records it beside the figures
    assert engine.kernels() == {
        "attention": "torch", "linear": "torch", "elementwise": "torch", "cuda_graphs": "off",
    }  # fmt: skip
