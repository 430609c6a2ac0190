"""The C norms, activation and rotary embedding (runtime/csrc/elementwise.c) against the torch
code they replace, on the layouts the model hands them."""

from __future__ import annotations

import pytest
import torch

from runtime.layers.activation import SiluAndMul
from runtime.layers.norm import RMSNorm
from runtime.layers.rotary import RotaryEmbedding
from runtime.native import load_kernels


def _norms(size: int) -> tuple[RMSNorm, RMSNorm]:
    """(an RMSNorm on torch, the same one on the C kernel), with weights that are not all 1."""
    on_torch, on_c = RMSNorm(size, 1e-6), RMSNorm(size, 1e-6)
    on_torch.weight.data.normal_()
    on_c.load_state_dict(on_torch.state_dict())
    on_c.native = load_kernels()
    return on_torch, on_c


@pytest.mark.parametrize("rows", [1, 3, 300])  # 300 x 256: past the threads' threshold
def test_rms_norm_with_and_without_the_residual(rows: int) -> None:
    torch.manual_seed(rows)
    torch_norm, c_norm = _norms(256)
    x, residual = torch.randn(rows, 256), torch.randn(rows, 256)
    assert torch.allclose(c_norm(x), torch_norm(x), atol=1e-5)
    want, want_sum = torch_norm(x, residual.clone())
    given = residual.clone()
    got, got_sum = c_norm(x, given)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(got_sum, want_sum)  # one float add each: exact
    assert got_sum is given  # updated in place: the stream is not copied each layer


def test_rms_norm_of_heads_read_from_a_wider_row() -> None:
    # Qwen3's q_norm: q is [tokens, heads, head_dim] inside the fused qkv output's rows.
    torch.manual_seed(0)
    torch_norm, c_norm = _norms(32)
    qkv = torch.randn(5, 4 * 32 + 2 * 2 * 32)
    q = qkv[:, : 4 * 32].view(5, 4, 32)
    assert torch.allclose(c_norm(q), torch_norm(q), atol=1e-5)


@pytest.mark.parametrize("d", [768, 13])  # whole vectors, and a tail of 5
def test_silu_and_mul_including_large_and_tiny_gates(d: int) -> None:
    torch.manual_seed(d)
    torch_act, c_act = SiluAndMul(), SiluAndMul()
    c_act.native = load_kernels()
    x = torch.randn(7, 2 * d) * 4
    x[0, :d] = torch.linspace(-100, 100, d)  # e^100 would overflow: sigmoid goes via e^-|g|
    got, want = c_act(x), torch_act(x)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rotary_on_q_and_k_views_rotates_them_in_place() -> None:
    torch.manual_seed(0)
    rotary = RotaryEmbedding(32, 512, 10000.0, None)
    positions = torch.tensor([0, 7, 300, 511, 2])
    qkv = torch.randn(5, (4 + 2 + 2) * 32)
    q, k = qkv[:, : 4 * 32].view(5, 4, 32), qkv[:, 4 * 32 : 6 * 32].view(5, 2, 32)
    want_q, want_k = rotary(positions).apply(q), rotary(positions).apply(k)
    v_before = qkv[:, 6 * 32 :].clone()
    rotary.native = load_kernels()
    rope = rotary(positions)
    got_q, got_k = rope.apply(q), rope.apply(k)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()
    assert torch.allclose(got_q, want_q, atol=1e-6) and torch.allclose(got_k, want_k, atol=1e-6)
    assert torch.equal(qkv[:, 6 * 32 :], v_before)  # v, beside them in the row, untouched
