"""Every attention backend computes what the reference does, and the engine picks one as
documented in runtime/attention/selection.py."""

from __future__ import annotations

import importlib.util
import random
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from runtime import native
from runtime.attention.cpu_kernel import CpuKernelAttention
from runtime.attention.interface import AttentionMetadata
from runtime.attention.reference import TorchAttention
from runtime.attention.selection import BACKEND_ENV, flash_unusable, select_backend

CPU = torch.device("cpu")


def decode_step(
    contexts: list[int], heads: int, kv_heads: int, head_dim: int, block_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """One decode token per sequence over a random, shuffled cache: (q, k, v, cache, meta)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in contexts]
    free = list(range(sum(need) + 3))  # a few blocks nobody owns
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in need]
    width = max(need)
    shape = TorchAttention().kv_cache_shape(len(free) + sum(need), block_size, kv_heads, head_dim)
    cache = torch.randn(shape, generator=gen)
    slots = [t[(c - 1) // block_size] * block_size + (c - 1) % block_size
             for t, c in zip(tables, contexts, strict=True)]  # fmt: skip
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.arange(len(contexts) + 1),
        context_lens=torch.tensor(contexts),
        block_tables=torch.tensor([t + [-1] * (width - len(t)) for t in tables]),
    )
    q = torch.randn(len(contexts), heads, head_dim, generator=gen)
    k = torch.randn(len(contexts), kv_heads, head_dim, generator=gen)
    v = torch.randn(len(contexts), kv_heads, head_dim, generator=gen)
    return q, k, v, cache, meta


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    # Groups 1, 2, 4, 8 and head_dims 32, 64, 128 have their own compiled loops; 3, 24, 16 not.
    [
        (8, 8, 32, 16),
        (8, 4, 32, 16),
        (8, 1, 24, 4),
        (4, 2, 64, 1),
        (6, 2, 16, 32),
        (16, 4, 128, 16),
        (6, 2, 64, 16),
    ],
)
def test_cpu_kernel_decode_equals_the_reference(
    heads: int, kv_heads: int, head_dim: int, block_size: int
) -> None:
    # Contexts of one token, exact multiples of the block and one far longer than the rest.
    contexts = [1, block_size, 2 * block_size + 1, 7, 300, 33]
    q, k, v, cache, meta = decode_step(contexts, heads, kv_heads, head_dim, block_size)
    want = TorchAttention().forward(q, k, v, cache.clone(), meta, head_dim**-0.5)
    got = CpuKernelAttention().forward(q, k, v, cache.clone(), meta, head_dim**-0.5)
    assert (got - want).abs().max().item() < 1e-5


def test_cpu_kernel_ignores_what_lies_past_a_context() -> None:
    q, k, v, cache, meta = decode_step([5, 40], 4, 2, 16, 16)
    before = CpuKernelAttention().forward(q, k, v, cache.clone(), meta, 0.25)
    # Poison every slot no context reaches: slots 5.. of the first sequence's block, and the
    # unowned blocks. A kernel reading past a context's end changes its output.
    poisoned = cache.clone()
    owned = set(meta.block_tables.flatten().tolist())
    for block in range(cache.shape[1]):
        if block not in owned:
            poisoned[:, block] = 1e4
    first = int(meta.block_tables[0, 0])
    poisoned[:, first, :, 5:] = 1e4
    after = CpuKernelAttention().forward(q, k, v, poisoned, meta, 0.25)
    assert torch.equal(before, after)


@pytest.fixture
def no_backend_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    return monkeypatch


def test_float32_on_the_cpu_selects_the_kernel(no_backend_env: pytest.MonkeyPatch) -> None:
    assert isinstance(select_backend(CPU, torch.float32, 16), CpuKernelAttention)


def test_other_cpu_dtypes_select_the_reference(no_backend_env: pytest.MonkeyPatch) -> None:
    backend = select_backend(CPU, torch.bfloat16, 16)
    assert type(backend) is TorchAttention


def test_the_environment_can_force_the_reference(no_backend_env: pytest.MonkeyPatch) -> None:
    no_backend_env.setenv(BACKEND_ENV, "torch")
    assert type(select_backend(CPU, torch.float32, 16)) is TorchAttention


def test_a_bad_backend_name_lists_the_choices(no_backend_env: pytest.MonkeyPatch) -> None:
    no_backend_env.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=r"RUNTIME_ATTENTION_BACKEND: expected one of auto"):
        select_backend(CPU, torch.float32, 16)


def test_forcing_the_kernel_for_bfloat16_is_refused(no_backend_env: pytest.MonkeyPatch) -> None:
    no_backend_env.setenv(BACKEND_ENV, "cpu-kernel")
    with pytest.raises(ValueError, match="needs float32"):
        select_backend(CPU, torch.bfloat16, 16)


@pytest.mark.usefixtures("no_compiler")
def test_without_a_compiler_the_reference_runs_and_the_log_says_why(
    no_backend_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="runtime.attention.selection"):
        backend = select_backend(CPU, torch.float32, 16)
    assert type(backend) is TorchAttention
    assert "no C compiler on PATH" in caplog.text


def test_a_failed_build_is_reported_with_the_compiler_output(
    no_backend_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\necho 'cc: out of luck' >&2\nexit 1\n")
    broken.chmod(0o755)
    no_backend_env.setenv("CC", str(broken))
    no_backend_env.setenv(native.CACHE_ENV, str(tmp_path / "kernels"))
    native.load_kernels.cache_clear()
    try:
        with pytest.raises(native.KernelUnavailableError, match="out of luck"):
            native.load_kernels()
    finally:
        native.load_kernels.cache_clear()
    assert list((tmp_path / "kernels").iterdir()) == []  # no half-built library left behind


def test_cpu_kernel_writes_the_reference_slots_and_skips_negative_ones() -> None:
    _, k, v, cache, meta = decode_step([3, 17, 9], 4, 2, 16, 4)
    want, got = cache.clone(), cache.clone()
    TorchAttention()._write(k, v, want, meta.slot_mapping)
    CpuKernelAttention()._write(k, v, got, meta.slot_mapping)
    assert torch.equal(got, want)
    padded = meta.slot_mapping.clone()
    padded[1] = -1  # a padding row (CUDA graphs pad batches so): it writes nowhere
    skipped = cache.clone()
    CpuKernelAttention()._write(k, v, skipped, padded)
    keep = torch.ones(len(padded), dtype=torch.bool)
    keep[1] = False
    expected = cache.clone()
    TorchAttention()._write(k[keep], v[keep], expected, meta.slot_mapping[keep])
    assert torch.equal(skipped, expected)


def test_loading_the_cpu_kernel_leaves_subnormal_floats_alone() -> None:
    # A library built with -ffast-math turns on flush-to-zero for the whole process at load.
    native.load_kernels()
    smallest = sys.float_info.min
    assert smallest / 2 > 0.0
    assert torch.tensor(smallest, dtype=torch.float64).div(2).item() > 0.0


CUDA = torch.device("cuda")  # only named: nothing here allocates on it


def test_on_cuda_without_flash_attn_auto_selects_triton_and_says_why(
    no_backend_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("triton")
    no_backend_env.setattr(importlib.util, "find_spec", _find_spec_without("flash_attn"))
    with caplog.at_level("INFO", logger="runtime.attention.selection"):
        backend = select_backend(CUDA, torch.bfloat16, 16)
    assert backend.name == "triton" and backend.supports_cuda_graphs
    assert "flash-attn is not installed" in caplog.text


def test_flash_attn_needs_half_precision_and_blocks_of_256(
    no_backend_env: pytest.MonkeyPatch,
) -> None:
    no_backend_env.setattr(importlib.util, "find_spec", lambda name: object())  # all installed
    assert flash_unusable(CUDA, torch.bfloat16, 256) is None
    assert flash_unusable(CUDA, torch.float16, 512) is None
    assert "multiples of 256" in str(flash_unusable(CUDA, torch.bfloat16, 16))
    assert "float16 or bfloat16" in str(flash_unusable(CUDA, torch.float32, 256))
    assert "runs on CUDA" in str(flash_unusable(CPU, torch.bfloat16, 256))


def test_flash_attn_is_unusable_for_a_model_with_sinks(
    no_backend_env: pytest.MonkeyPatch,
) -> None:
    no_backend_env.setattr(importlib.util, "find_spec", lambda name: object())  # all installed
    assert flash_unusable(CUDA, torch.bfloat16, 256) is None
    assert "no attention sinks" in str(flash_unusable(CUDA, torch.bfloat16, 256, sinks=True))
    # Named before the device: no other engine set-up would make flash-attn serve the model.
    assert "no attention sinks" in str(flash_unusable(CPU, torch.bfloat16, 256, sinks=True))


def test_on_cuda_a_model_with_sinks_auto_selects_triton_and_says_why(
    no_backend_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("triton")
    # Everything installed and a flash-attn block size: only the sinks rule flash-attn out.
    no_backend_env.setattr(importlib.util, "find_spec", lambda name: object())
    with caplog.at_level("INFO", logger="runtime.attention.selection"):
        backend = select_backend(CUDA, torch.bfloat16, 256, sinks=True)
    assert backend.name == "triton"
    assert "no attention sinks" in caplog.text


def test_forcing_flash_attn_for_a_model_with_sinks_is_refused(
    no_backend_env: pytest.MonkeyPatch,
) -> None:
    no_backend_env.setattr(importlib.util, "find_spec", lambda name: object())
    no_backend_env.setenv(BACKEND_ENV, "flash-attn")
    with pytest.raises(ValueError, match="flash-attn 2 has no attention sinks"):
        select_backend(CUDA, torch.bfloat16, 256, sinks=True)


def test_forcing_triton_on_the_cpu_needs_its_interpreter(
    no_backend_env: pytest.MonkeyPatch,
) -> None:
    no_backend_env.setenv(BACKEND_ENV, "triton")
    no_backend_env.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        select_backend(CPU, torch.float32, 16)


def _find_spec_without(missing: str) -> Callable[[str], object]:
    real = importlib.util.find_spec

    def find_spec(name: str) -> object:
        return None if name == missing else real(name)

    return find_spec
