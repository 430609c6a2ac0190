"""The paged KV cache: how a sequence's tokens are split into steps, batched with others, or
scattered over blocks must not change its logits, with either CPU backend."""

from __future__ import annotations

import random

import pytest
import torch

from runtime.attention.cpu_kernel import CpuKernelAttention
from runtime.attention.reference import TorchAttention
from runtime.models.llama import LlamaForCausalLM
from tests.runtime.paged import Chunk, new_caches, prefill, run_step, small_llama

BLOCK = 4
TOLERANCE = 1e-5  # max abs logit difference, float32; the paths differ only in summation order
PROMPT = [(i * 53 + 7) % 320 for i in range(23)]  # 23: not a multiple of BLOCK


@pytest.fixture(scope="module", params=[TorchAttention, CpuKernelAttention])
def model(request: pytest.FixtureRequest) -> LlamaForCausalLM:
    return small_llama(request.param())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() < TOLERANCE


def test_prefix_then_decoding_one_token_at_a_time_equals_one_prefill(
    model: LlamaForCausalLM,
) -> None:
    whole = prefill(model, PROMPT, BLOCK)
    blocks = list(range(-(-len(PROMPT) // BLOCK)))
    caches = new_caches(model, len(blocks), BLOCK)
    steps = [run_step(model, caches, [Chunk(PROMPT[:9], 0, blocks)])[0]]
    for i in range(9, len(PROMPT)):
        steps += run_step(model, caches, [Chunk([PROMPT[i]], i, blocks)])
    assert _close(torch.cat(steps), whole)


def test_prefill_in_two_chunks_equals_one_prefill(model: LlamaForCausalLM) -> None:
    whole = prefill(model, PROMPT, BLOCK)
    blocks = list(range(-(-len(PROMPT) // BLOCK)))
    caches = new_caches(model, len(blocks), BLOCK)
    first = run_step(model, caches, [Chunk(PROMPT[:10], 0, blocks)])[0]  # ends mid-block
    second = run_step(model, caches, [Chunk(PROMPT[10:], 10, blocks)])[0]
    assert _close(torch.cat([first, second]), whole)


def test_mixed_batch_over_shuffled_blocks_equals_each_sequence_alone(
    model: LlamaForCausalLM,
) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(320) for _ in range(n)] for n in (13, 10, 16, 21, 1)]
    # (tokens already cached, tokens new this step): a whole prefill, a decode, a prefill's
    # second chunk, a decode with a long context, and a one-token prompt.
    split = [(0, 13), (9, 1), (10, 6), (20, 1), (0, 1)]
    free = list(range(40))
    rng.shuffle(free)  # block tables neither contiguous nor ordered
    tables = [[free.pop() for _ in range(-(-len(p) // BLOCK))] for p in prompts]
    caches = new_caches(model, 40, BLOCK)
    # Earlier steps put each context in the cache (one batch, so those share a step too).
    earlier = [Chunk(p[:c], 0, t) for p, (c, _), t in zip(prompts, split, tables, strict=True) if c]
    run_step(model, caches, earlier)

    now = run_step(model, caches, [
        Chunk(p[c : c + n], c, t) for p, (c, n), t in zip(prompts, split, tables, strict=True)
    ])  # fmt: skip
    for p, (c, n), got in zip(prompts, split, now, strict=True):
        assert _close(got, prefill(model, p, BLOCK)[c : c + n])


def test_new_keys_and_values_land_in_the_slots_named(model: LlamaForCausalLM) -> None:
    caches = new_caches(model, 8, BLOCK)
    run_step(model, caches, [Chunk(PROMPT[:6], 0, [5, 2])])
    # [2, blocks, kv_heads, block_size, head_dim] -> one flag per slot (block * BLOCK + offset)
    written = caches[0].abs().sum(dim=(0, 2, 4)).flatten() > 0
    expected = torch.zeros(8 * BLOCK, dtype=torch.bool)
    expected[[20, 21, 22, 23, 8, 9]] = True  # block 5 slots 0-3, then block 2 slots 0-1
    assert torch.equal(written, expected)
