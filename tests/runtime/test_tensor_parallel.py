"""Tensor parallelism on CPU (gloo): N ranks compute what one process computes.

Shard layout is checked in-process (a rank's model can be built and loaded without a process
group); the tests that start worker ranks are marked slow. Float32 tolerance: the ranks sum
partial matmuls in another order than one process does, so logits agree to 1e-5 (observed
~1e-6), and greedy tokens exactly.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from runtime.attention.reference import TorchAttention
from runtime.config import EngineConfig, ModelConfig
from runtime.engine import Engine
from runtime.loader import load_checkpoint, load_dummy
from runtime.models.llama import LlamaForCausalLM
from runtime.parallel import TensorParallel
from runtime.sequence import SamplingParams
from runtime.tiny import ensure_tiny
from runtime.worker import WorkerDiedError
from tests.runtime.ranks import assert_two_ranks_give_the_tokens_of_one

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
TINY = EngineConfig(model="tiny", max_model_len=256, num_kv_blocks=64)
# A small model whose vocabulary (1001) does not split evenly: the last rank's slice is padded.
SHAPE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 1001, "hidden_size": 128,
         "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "head_dim": 32, "max_position_embeddings": 512}  # fmt: skip
PROMPTS = [[(7 * i + j) % 997 + 3 for j in range(n)] for i, n in enumerate((3, 17, 40, 9, 64))]


# Dummy weights are drawn on the model's device, by that device's generator.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]  # fmt: skip


def _shard(cfg: ModelConfig, rank: int, size: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    with torch.device(device):
        model = LlamaForCausalLM(cfg, TorchAttention(), TensorParallel(rank, size))
    load_dummy(model, seed=0)
    return dict(model.named_parameters())


def _expected_shard(name: str, full: torch.Tensor, cfg: ModelConfig, rank: int) -> torch.Tensor:
    """Rank `rank` of 2's slice of the whole tensor, written out per layer kind."""
    if "qkv_proj" in name:
        hd, heads, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q, k, v = full.split([heads * hd, kv * hd, kv * hd])
        kv_index, kv_rows = (rank, kv // 2 * hd) if kv >= 2 else (0, hd)  # 1 head: replicated
        return torch.cat([q.chunk(2)[rank], *(t[kv_index * kv_rows :][:kv_rows] for t in (k, v))])
    if "gate_up_proj" in name:
        return torch.cat([part.chunk(2)[rank] for part in full.chunk(2)])
    if "o_proj" in name or "down_proj" in name:
        return full.chunk(2, dim=1)[rank]
    if "embed_tokens" in name or "lm_head" in name:
        rows = -(-cfg.vocab_size // 2)
        part = full[rank * rows : (rank + 1) * rows]
        return torch.cat([part, part.new_zeros(rows - len(part), part.shape[1])])
    return full  # norms: replicated


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-split", "kv-replicated"])
@pytest.mark.parametrize("rank", [0, 1])
def test_dummy_shards_are_slices_of_the_single_process_model(
    kv_heads: int, rank: int, device: str
) -> None:
    cfg = ModelConfig.from_hf({**SHAPE, "num_key_value_heads": kv_heads})
    full, shard = _shard(cfg, 0, 1, device), _shard(cfg, rank, 2, device)
    assert shard.keys() == full.keys()
    for name, param in shard.items():
        assert torch.equal(param, _expected_shard(name, full[name], cfg, rank)), name


def test_checkpoint_shards_are_slices_of_the_single_process_model() -> None:
    cfg = ModelConfig.from_hf(ensure_tiny())
    models = []
    for tp in (TensorParallel(0, 1), TensorParallel(1, 2)):
        model = LlamaForCausalLM(cfg, TorchAttention(), tp)
        load_checkpoint(model, ensure_tiny())
        models.append(dict(model.named_parameters()))
    full, shard = models
    for name, param in shard.items():
        assert torch.equal(param, _expected_shard(name, full[name], cfg, 1)), name


def test_shard_shapes_at_two_ranks() -> None:
    cfg = ModelConfig.from_hf(ensure_tiny())  # 8 query heads, 4 K/V heads of 32, MLP 768
    shard = _shard(cfg, 1, 2)
    layer = "model.layers.0."
    assert shard[layer + "self_attn.qkv_proj.weight"].shape == (4 * 32 + 2 * 2 * 32, 256)
    assert shard[layer + "self_attn.o_proj.weight"].shape == (256, 4 * 32)
    assert shard[layer + "mlp.gate_up_proj.weight"].shape == (2 * 384, 256)
    assert shard[layer + "mlp.down_proj.weight"].shape == (256, 384)
    assert shard["model.embed_tokens.weight"].shape == (cfg.vocab_size // 2, 256)
    assert shard["lm_head.weight"].shape == (cfg.vocab_size // 2, 256)
    assert shard[layer + "input_layernorm.weight"].shape == (256,)


def test_heads_that_do_not_divide_are_refused_before_any_rank_starts() -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 .*num_attention_heads \(8\)"):
        Engine(EngineConfig(model="tiny", tensor_parallel_size=3))


def test_kv_heads_neither_dividing_nor_divided_are_refused() -> None:
    cfg = ModelConfig.from_hf({**SHAPE, "num_attention_heads": 12, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\)"):
        cfg.check_tensor_parallel(2)


# --- with worker ranks (slow) ----------------------------------------------------------------


@pytest.fixture
def tp2() -> Iterator[Engine]:
    engine = Engine(EngineConfig(**{**vars(TINY), "tensor_parallel_size": 2}))
    yield engine
    engine.close()


@pytest.mark.slow
def test_two_ranks_give_the_greedy_tokens_of_one(tp2: Engine) -> None:
    assert tp2.generate(PROMPTS, GREEDY) == Engine(TINY).generate(PROMPTS, GREEDY)


@pytest.mark.slow
def test_two_ranks_give_the_logits_of_one_within_float32_tolerance(tp2: Engine) -> None:
    one = Engine(TINY)
    logits = []
    for engine in (one, tp2):
        for prompt in PROMPTS:
            engine.add_request(prompt, GREEDY)
        logits.append(engine.logits(engine.scheduler.schedule()))
    assert logits[0].shape == logits[1].shape == (len(PROMPTS), one.model_config.vocab_size)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-split", "kv-replicated"])
def test_dummy_weights_give_the_same_tokens_at_any_size(tmp_path: Path, kv_heads: int) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**SHAPE, "num_key_value_heads": kv_heads}))
    cfg = EngineConfig(model=str(tmp_path), load_format="dummy", max_model_len=256,
                       num_kv_blocks=64)  # fmt: skip
    assert_two_ranks_give_the_tokens_of_one(cfg, PROMPTS, GREEDY)


@pytest.mark.slow
def test_a_killed_worker_stops_the_engine_with_an_error_naming_it(tp2: Engine) -> None:
    for prompt in PROMPTS:
        tp2.add_request(prompt, SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True))
    tp2.step()
    pid = tp2.workers.processes[0].pid if tp2.workers is not None else None
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"tensor-parallel rank 1 died \(exit code -9\)"):
        while tp2.has_work():
            tp2.step()
    assert time.monotonic() - start < 5


@pytest.mark.slow
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantised_shards_give_the_greedy_tokens_of_one_rank(method: str) -> None:
    """Each rank quantises its own shard. int4 groups never straddle a shard boundary, so the
    shards are exact slices; int8 scales of a row-parallel layer span half a row each, close
    enough that greedy tokens on tiny agree."""
    cfg = EngineConfig(**{**vars(TINY), "quantization": method})
    two = Engine(EngineConfig(**{**vars(cfg), "tensor_parallel_size": 2}))
    try:
        assert two.generate(PROMPTS, GREEDY) == Engine(cfg).generate(PROMPTS, GREEDY)
    finally:
        two.close()
