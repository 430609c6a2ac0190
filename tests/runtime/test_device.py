"""The engine's device, dtype and KV cache size: the choices and the sizing arithmetic, on the
CPU (CUDA is simulated where only its presence matters; nothing is allocated on it)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from runtime.attention.reference import TorchAttention
from runtime.config import EngineConfig
from runtime.device import DEVICE_ENV, engine_device, model_dtype
from runtime.engine import Engine
from runtime.kv_sizing import GIB, MemoryProfile, kv_block_bytes, kv_blocks_for
from runtime.model_runner import CPU_CACHE_SEQUENCES, ModelRunner, profile_step

MIB = 1 << 20


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine that reports two CUDA devices (nothing below allocates on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.fixture
def on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU path, on any machine."""
    monkeypatch.setenv(DEVICE_ENV, "cpu")


# --- device ----------------------------------------------------------------------------------


def test_without_cuda_every_rank_runs_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(DEVICE_ENV, raising=False)

    assert [str(engine_device(r)) for r in (0, 1)] == ["cpu", "cpu"]


@pytest.mark.usefixtures("cuda")
def test_with_cuda_rank_r_runs_on_cuda_r() -> None:
    assert [str(engine_device(r)) for r in (0, 1)] == ["cuda:0", "cuda:1"]


@pytest.mark.usefixtures("cuda")
def test_under_torchrun_local_rank_picks_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")

    assert str(engine_device(3)) == "cuda:1"  # global rank 3, second device of its machine


@pytest.mark.usefixtures("cuda")
def test_runtime_device_cpu_runs_the_cpu_path_on_a_gpu_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(DEVICE_ENV, "cpu")

    assert str(engine_device(1)) == "cpu"


@pytest.mark.usefixtures("cuda")
def test_a_rank_without_its_own_device_is_refused() -> None:
    with pytest.raises(ValueError, match="needs cuda:2 but 2 CUDA devices"):
        engine_device(2)


def test_runtime_device_cuda_without_cuda_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(DEVICE_ENV, "cuda")

    with pytest.raises(ValueError, match="RUNTIME_DEVICE=cuda but this torch sees no CUDA"):
        engine_device(0)


def test_an_unknown_runtime_device_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_ENV, "tpu")

    with pytest.raises(ValueError, match="expected one of auto, cpu, cuda, got 'tpu'"):
        engine_device(0)


# --- dtype -----------------------------------------------------------------------------------

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("requested", "checkpoint", "device", "expected"),
    [
        ("auto", torch.float32, CPU, torch.float32),  # the CPU keeps float32
        ("auto", torch.float32, GPU, torch.bfloat16),  # CUDA halves a float32 checkpoint
        ("auto", torch.float16, GPU, torch.float16),  # a half checkpoint keeps its own type
        ("auto", torch.bfloat16, CPU, torch.bfloat16),
        ("float32", torch.float32, GPU, torch.float32),  # an explicit dtype always wins
        ("float16", torch.bfloat16, CPU, torch.float16),
    ],
)
def test_dtype_auto_keeps_the_checkpoints_but_bfloat16_for_float32_on_cuda(
    requested: str, checkpoint: torch.dtype, device: torch.device, expected: torch.dtype
) -> None:
    assert model_dtype(requested, checkpoint, device) == expected


# --- KV cache sizing -------------------------------------------------------------------------


def test_a_block_holds_k_and_v_of_every_layer_for_this_ranks_heads() -> None:
    layers, bs, heads, head_dim = 32, 16, 8, 128  # Llama-3-8B at tensor_parallel_size 1

    size = kv_block_bytes(TorchAttention(), layers, bs, heads, head_dim, torch.bfloat16)

    assert size == 2 * layers * bs * heads * head_dim * 2 == 2 * MIB


@pytest.mark.parametrize(
    ("memory", "utilization", "expected"),
    [
        # 80 GiB * 0.9 = 72; minus 16 + 4 + 2 leaves 50 GiB: 25,600 blocks of 2 MiB.
        (MemoryProfile(80 * GIB, 16 * GIB, 4 * GIB, 2 * GIB), 0.9, 25_600),
        # The same device at 0.5: 40 - 22 = 18 GiB.
        (MemoryProfile(80 * GIB, 16 * GIB, 4 * GIB, 2 * GIB), 0.5, 9_216),
        # A remainder smaller than a block is left unused: 1 GiB + 3 MiB holds 513 blocks.
        (MemoryProfile(2 * GIB, GIB - 3 * MIB, 0, 0), 1.0, 513),
    ],
)
def test_kv_blocks_are_what_utilization_leaves_after_weights_activations_and_non_torch(
    memory: MemoryProfile, utilization: float, expected: int
) -> None:
    assert kv_blocks_for(memory, utilization, 2 * MIB, min_blocks=1) == expected


def test_no_block_fitting_is_an_error_naming_utilization_and_the_figures() -> None:
    memory = MemoryProfile(80 * GIB, 70 * GIB, 4 * GIB, 2 * GIB)  # 72 - 76 < 0

    with pytest.raises(ValueError, match="no KV cache block fits") as error:
        kv_blocks_for(memory, 0.9, 2 * MIB, min_blocks=1)
    message = str(error.value)
    assert "gpu_memory_utilization=0.9 allows 72.00 GiB" in message
    assert "weights 70.00 GiB, peak activations 4.00 GiB, non-torch 2.00 GiB" in message
    assert "leaves -4.00 GiB" in message and "Raise gpu_memory_utilization" in message


def test_too_few_blocks_for_one_longest_sequence_says_to_lower_max_model_len() -> None:
    memory = MemoryProfile(10 * GIB, 9 * GIB - 100 * MIB, 0, 0)  # 100 MiB: 50 blocks

    with pytest.raises(ValueError, match=r"50 KV cache blocks fit but one max_model_len .* 64"):
        kv_blocks_for(memory, 0.9, 2 * MIB, min_blocks=64)
    assert kv_blocks_for(memory, 0.9, 2 * MIB, min_blocks=50) == 50


def test_the_profiling_step_is_the_largest_step_split_into_max_model_len_prompts() -> None:
    cfg = EngineConfig(model="tiny", max_num_batched_tokens=300, block_size=16)

    step, blocks = profile_step(cfg, max_model_len=128)

    assert [s.num_new_tokens for s in step.scheduled] == [128, 128, 44]
    assert all(s.samples and s.seq.num_computed_tokens == 0 for s in step.scheduled)
    assert blocks == 8 + 8 + 3
    tables = [block for s in step.scheduled for block in s.seq.block_table]
    assert tables == list(range(blocks))  # consecutive, none shared


def test_the_profiling_step_is_capped_by_max_num_seqs() -> None:
    cfg = EngineConfig(model="tiny", max_num_batched_tokens=8192, max_num_seqs=2)

    step, _ = profile_step(cfg, max_model_len=100)

    assert [s.num_new_tokens for s in step.scheduled] == [100, 100]


@pytest.mark.usefixtures("on_the_cpu")
def test_the_profiling_step_runs_through_the_model() -> None:
    cfg = EngineConfig(model="tiny", max_model_len=64, num_kv_blocks=8, block_size=8)
    engine = Engine(cfg)
    model, mcfg = engine.runner.model, engine.model_config
    step, blocks = profile_step(dataclasses.replace(cfg, max_num_batched_tokens=150), 64)
    probe = ModelRunner(
        model, TorchAttention(), mcfg.num_hidden_layers, mcfg.num_key_value_heads,
        mcfg.head_dim, blocks, cfg.block_size, torch.float32, torch.device("cpu"),
    )  # fmt: skip

    logits = probe.execute(probe.prepare(step))

    assert logits is not None and logits.shape == (3, mcfg.vocab_size)
    assert bool(torch.isfinite(logits).all())


# --- the load breakdown on the CPU -----------------------------------------------------------


@pytest.mark.usefixtures("on_the_cpu")
def test_on_the_cpu_the_cache_holds_cpu_cache_sequences_longest_sequences() -> None:
    engine = Engine(EngineConfig(model="tiny", max_model_len=100, block_size=16))

    breakdown = engine.load_breakdown()

    assert breakdown["num_kv_blocks"] == math.ceil(100 / 16) * CPU_CACHE_SEQUENCES == 112
    assert breakdown["num_kv_blocks"] == engine.stats().num_kv_blocks
    assert breakdown["kv_cache_bytes"] == engine.runner.kv_cache_bytes > 0
    assert breakdown["profile_s"] == 0.0  # no profiling pass off CUDA


@pytest.mark.usefixtures("on_the_cpu")
def test_num_kv_blocks_overrides_the_sizing_rule() -> None:
    engine = Engine(EngineConfig(model="tiny", max_model_len=100, num_kv_blocks=20))

    assert engine.load_breakdown()["num_kv_blocks"] == 20
