"""The engine end to end on CPU: greedy tokens must not depend on how requests are batched."""

from __future__ import annotations

import dataclasses
import filecmp
import random
from pathlib import Path

import pytest
import torch

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.sequence import SamplingParams
from runtime.tiny import ensure_tiny

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
BASE = EngineConfig(model="tiny", max_num_batched_tokens=4096, block_size=8, seed=0)


def _prompts(n: int, shared_prefix: int = 0) -> list[list[int]]:
    rng = random.Random(1)
    prefix = [rng.randrange(3, 2048) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(3, 2048) for _ in range(rng.randint(3, 40))] for _ in range(n)]


@pytest.fixture(scope="module")
def alone() -> list[list[int]]:
    """Each prompt run by itself: the reference for every batching below."""
    engine = Engine(BASE)
    return [engine.generate([p], GREEDY)[0] for p in _prompts(6, shared_prefix=20)]


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"enable_prefix_caching": True},
        {"max_num_batched_tokens": 16},  # long prompts are prefilled in chunks
        {"max_num_batched_tokens": 16, "enable_prefix_caching": True},
        {"num_kv_blocks": 14},  # too few blocks for all six at once: forced preemption
    ],
    ids=["batched", "prefix-cache", "chunked", "chunked+prefix", "preemption"],
)
def test_batched_greedy_tokens_equal_single_requests(
    alone: list[list[int]], changes: dict[str, object]
) -> None:
    engine = Engine(dataclasses.replace(BASE, **changes))  # type: ignore[arg-type]
    assert engine.generate(_prompts(6, shared_prefix=20), GREEDY) == alone
    if "num_kv_blocks" in changes:
        assert engine.scheduler.num_preemptions > 0
    assert engine.blocks.num_free_blocks == len(engine.blocks.blocks)  # all blocks returned


def test_prefix_cache_serves_a_repeated_prompt(alone: list[list[int]]) -> None:
    engine = Engine(dataclasses.replace(BASE, enable_prefix_caching=True))
    prompt = _prompts(6, shared_prefix=20)[0]
    first = engine.generate([prompt], GREEDY)
    seq_id = engine.add_request(prompt, GREEDY)
    seq = engine.seqs[seq_id]
    engine.step()
    assert seq.num_cached_tokens >= 16
    while engine.has_work():
        engine.step()
    assert first == [alone[0]] and seq.output_ids == alone[0]


def test_max_tokens_and_eos_end_generation() -> None:
    engine = Engine(BASE)
    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0.0))[0]
    assert 1 <= len(out) <= 5
    eos = engine.model_config.eos_token_id
    assert len(out) == 5 or out[-1] == eos


def test_tiny_is_a_real_checkpoint_built_deterministically(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    a, b = ensure_tiny(tmp_path / "a"), ensure_tiny(tmp_path / "b")
    assert filecmp.cmp(a / "model.safetensors", b / "model.safetensors", shallow=False)
    assert filecmp.cmp(a / "tokenizer.json", b / "tokenizer.json", shallow=False)
    tok = AutoTokenizer.from_pretrained(a, local_files_only=True)
    text = "The server streams tokens, fast."
    assert tok.decode(tok.encode(text)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    assert chat == f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    assert len(tok.encode("<|im_end|>")) == 1  # special tokens are single, unsplittable ids
    reference = LlamaForCausalLM.from_pretrained(a).eval()
    engine = Engine(dataclasses.replace(BASE, model=str(a)))
    prompt = tok.encode(text)
    ours = engine.generate([prompt], GREEDY)[0]
    with torch.inference_mode():
        theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                    min_new_tokens=12)[0, len(prompt):].tolist()  # fmt: skip
    assert ours == theirs


def test_load_time_is_broken_down() -> None:
    load = Engine(BASE).load
    assert load.read_s > 0 and load.warmup_s > 0 and load.kv_cache_bytes > 0
    # 4 layers x (K, V) x blocks x block_size x kv_heads x head_dim x 4 bytes
    blocks = -(-4096 // BASE.block_size) * 16
    assert load.kv_cache_bytes == 4 * 2 * blocks * BASE.block_size * 4 * 32 * 4


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("max_num_seqs", 0, "max_num_seqs: expected an integer >= 1"),
        ("gpu_memory_utilization", 1.5, "gpu_memory_utilization: expected a fraction in"),
        ("load_format", "pt", "load_format: expected auto or dummy"),
        ("dtype", "int3", "dtype: expected one of auto, float32"),
        ("tensor_parallel_size", 0, "tensor_parallel_size: expected an integer >= 1"),
    ],
)
def test_bad_engine_config_names_the_field(field: str, value: object, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        EngineConfig(model="tiny", **{field: value})  # type: ignore[arg-type]


def test_unknown_model_says_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="neither `tiny`, a named architecture"):
        Engine(EngineConfig(model="/nowhere"))


def test_max_model_len_beyond_the_model_is_refused() -> None:
    with pytest.raises(ValueError, match=r"max_model_len: expected at most .* \(4096\), got 4097"):
        Engine(dataclasses.replace(BASE, max_model_len=4097))


def test_named_architecture_builds_with_dummy_weights() -> None:
    engine = Engine(EngineConfig(model="small", load_format="dummy", max_model_len=64,
                                 num_kv_blocks=32))  # fmt: skip
    out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0.0,
                                                      ignore_eos=True))  # fmt: skip
    assert len(out[0]) == 4
