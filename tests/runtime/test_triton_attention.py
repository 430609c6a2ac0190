"""The Triton backend computes what the reference does (on the CPU). On a GPU machine its
kernels run compiled, on CUDA copies of the inputs; without one they run in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which is slow: shapes are small."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

pytest.importorskip("triton")

from runtime.attention.interface import AttentionMetadata
from runtime.attention.reference import TorchAttention
from runtime.attention.triton_paged import TritonAttention, paged_decode, splits_for, store_kv
from runtime.models.llama import LlamaForCausalLM
from tests.runtime.paged import Chunk, new_caches, run_step, small_llama
from tests.runtime.test_attention_backends import decode_step
from tests.runtime.test_attention_sinks_window import SINKS, assert_matches, naive_attention

# Where the kernels run: CUDA when there is one (compiled), else the CPU (interpreted).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
    meta: AttentionMetadata, scale: float,
) -> torch.Tensor:  # fmt: skip
    """TritonAttention().forward on DEVICE; the output, and `cache` updated, on the CPU."""
    on = [t.to(DEVICE) for t in (q, k, v, cache)]
    moved = AttentionMetadata(*(getattr(meta, f.name).to(DEVICE) for f in dataclasses.fields(meta)))
    out = TritonAttention().forward(*on, moved, scale)
    cache.copy_(on[3].cpu())
    return out.cpu()


def _store(k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """store_kv on DEVICE, `cache` updated in place."""
    on_device = cache.to(DEVICE)
    store_kv(k.to(DEVICE), v.to(DEVICE), on_device, slots.to(DEVICE))
    cache.copy_(on_device.cpu())


# bfloat16 keeps 8 bits of mantissa: one rounding of an output near 4 is up to 2^-7 = 0.008,
# and the softmax weights are rounded too (as on tensor cores). float16 keeps 11 bits.
LOW_PRECISION = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _padding_row(meta: AttentionMetadata) -> AttentionMetadata:
    """meta plus one more sequence as a CUDA-graph batch pads: slot -1, no context, no blocks."""
    seqs = meta.context_lens.shape[0]
    return AttentionMetadata(
        slot_mapping=torch.cat([meta.slot_mapping, torch.tensor([-1])]),
        query_start_loc=torch.arange(seqs + 2),
        context_lens=torch.cat([meta.context_lens, torch.tensor([0])]),
        block_tables=torch.cat([meta.block_tables, torch.full_like(meta.block_tables[:1], -1)]),
    )


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    [(8, 8, 32, 16), (8, 4, 24, 4), (8, 1, 64, 1), (8, 2, 32, 6), (4, 2, 32, 128)],
)
def test_decode_equals_the_reference(
    heads: int, kv_heads: int, head_dim: int, block_size: int
) -> None:
    # Contexts of one token, exact multiples of the block and one far longer than the rest.
    contexts = [1, block_size, 3 * block_size, 2 * block_size + 1, 7, 300, 33]
    q, k, v, cache, meta = decode_step(contexts, heads, kv_heads, head_dim, block_size)
    want = TorchAttention().forward(q, k, v, cache.clone(), meta, head_dim**-0.5)
    got = _triton(q, k, v, cache.clone(), meta, head_dim**-0.5)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize(("block_size", "partition"), [(16, 64), (4, 32), (64, 64)])
def test_contexts_split_over_programs_combine_to_the_reference(
    block_size: int, partition: int
) -> None:
    # Contexts in one part, ending on a part's edge, spanning several, an empty one (a padding
    # row: every part sees no key), and the longest setting how many parts there are.
    contexts = [1, partition, partition + 1, 3 * partition - 5, 0, 5 * partition]
    q, k, v, cache, meta = decode_step([max(c, 1) for c in contexts], 8, 2, 32, block_size)
    meta = dataclasses.replace(meta, context_lens=torch.tensor(contexts))  # row 4 now empty
    TorchAttention()._write(k, v, cache, meta.slot_mapping)  # the new tokens, as forward does
    on = [t.to(DEVICE) for t in (q, cache, meta.block_tables, meta.context_lens)]
    got = paged_decode(*on, 32**-0.5, partition=partition).cpu()
    assert splits_for(6 * 2, meta.block_tables.shape[1] * block_size, DEVICE, partition) > 1
    for i, context in enumerate(contexts):
        if context == 0:
            assert torch.equal(got[i], torch.zeros_like(got[i]))
            continue
        blocks = meta.block_tables[i, : -(-context // block_size)]
        keys, values = (cache[j, blocks].transpose(0, 1).reshape(2, -1, 32)[:, :context]
                        for j in (0, 1))  # fmt: skip
        want = torch.nn.functional.scaled_dot_product_attention(
            q[i][:, None], keys, values, scale=32**-0.5, enable_gqa=True
        )[:, 0]
        assert (got[i] - want).abs().max().item() < 1e-5, (i, context)


@pytest.mark.parametrize("sinks", SINKS)
# Windows starting inside a part, crossing one or several parts' edges, and wider than every
# context; a partition of 32 (two tiles) cuts the longest context into five parts.
@pytest.mark.parametrize("window", [None, 20, 40, 100, 200])
def test_split_contexts_with_a_window_and_sinks_combine_to_the_definition(
    window: int | None, sinks: str
) -> None:
    contexts = [1, 31, 33, 70, 0, 160]  # an empty one too: a padding row, every part empty
    q, k, v, cache, meta = decode_step([max(c, 1) for c in contexts], 8, 2, 16, 4)
    meta = dataclasses.replace(meta, context_lens=torch.tensor(contexts))
    TorchAttention()._write(k, v, cache, meta.slot_mapping)  # the new tokens, as forward does
    assert splits_for(6 * 2, meta.block_tables.shape[1] * 4, DEVICE, 32) > 1
    logits = SINKS[sinks]
    on = [t.to(DEVICE) for t in (q, cache, meta.block_tables, meta.context_lens)]
    got = paged_decode(*on, 0.25, window, None if logits is None else logits.to(DEVICE),
                       partition=32).cpu()  # fmt: skip
    assert torch.equal(got[4], torch.zeros_like(got[4]))
    assert_matches(got, naive_attention(q, cache, meta, 0.25, window, logits))


def test_programs_that_fill_the_gpu_are_not_split() -> None:
    assert splits_for(1 * 8, 4096, torch.device("cpu")) == 8  # batch 1, 8 K/V heads: 8 parts
    assert splits_for(64 * 8, 4096, torch.device("cpu")) == 1  # 512 programs: enough
    assert splits_for(8, 100, torch.device("cpu")) == 1  # a short context is one part anyway


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_decode_is_within_rounding_of_float32(dtype: torch.dtype) -> None:
    q, k, v, cache, meta = decode_step([1, 12, 300, 33], 8, 2, 32, 6)
    q, k, v, cache = (t.to(dtype) for t in (q, k, v, cache))
    # The exact answer for these (rounded) inputs, and the reference's own error against it.
    exact = TorchAttention().forward(q.float(), k.float(), v.float(), cache.float(), meta, 0.2)
    reference = TorchAttention().forward(q, k, v, cache.clone(), meta, 0.2)
    got = _triton(q, k, v, cache.clone(), meta, 0.2)
    assert got.dtype == dtype
    assert (reference.float() - exact).abs().max().item() < LOW_PRECISION[dtype]
    assert (got.float() - exact).abs().max().item() < LOW_PRECISION[dtype]


@pytest.mark.parametrize(("kv_heads", "head_dim", "block_size"), [(2, 32, 16), (3, 24, 6)])
def test_store_writes_the_named_slots_and_skips_slot_minus_one(
    kv_heads: int, head_dim: int, block_size: int
) -> None:
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(TorchAttention().kv_cache_shape(5, block_size, kv_heads, head_dim),
                        generator=gen)  # fmt: skip
    slots = torch.tensor([3 * block_size + 1, -1, 0, 5 * block_size - 1, -1, block_size])
    k = torch.randn(len(slots), kv_heads, head_dim, generator=gen)
    v = torch.randn(len(slots), kv_heads, head_dim, generator=gen)
    want, got = cache.clone(), cache.clone()
    real = slots >= 0
    TorchAttention()._write(k[real], v[real], want, slots[real])
    _store(k, v, got, slots)
    assert torch.equal(got, want)


def test_a_store_of_padding_rows_changes_nothing() -> None:
    cache = torch.randn(TorchAttention().kv_cache_shape(3, 4, 2, 16))
    k, v = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    after = cache.clone()
    _store(k, v, after, torch.tensor([-1, -1]))
    assert torch.equal(after, cache)


def test_an_empty_context_outputs_zeros_and_leaves_the_other_rows_alone() -> None:
    q, k, v, cache, meta = decode_step([5, 40, 17], 8, 2, 32, 16)
    alone = _triton(q, k, v, cache.clone(), meta, 0.2)
    padded = _padding_row(meta)
    # A padding row's query is whatever its token gave; NaN shows any use of it reaching out.
    q, k, v = (torch.cat([t, torch.full_like(t[:1], float("nan"))]) for t in (q, k, v))
    with_padding = _triton(q, k, v, cache.clone(), padded, 0.2)
    assert torch.equal(with_padding[-1], torch.zeros_like(with_padding[-1]))
    assert torch.equal(with_padding[:-1], alone)


@pytest.mark.parametrize("block_size", [16, 6])  # a tile within a block, a tile across blocks
def test_decode_reads_nothing_past_a_context(block_size: int) -> None:
    q, k, v, cache, meta = decode_step([5, 40, 1], 4, 2, 16, block_size)
    before = _triton(q, k, v, cache.clone(), meta, 0.25)
    # The same step with every block renumbered one up, and NaN in every slot no context
    # reaches: the new first block (what a masked table read would give), the new last (what
    # block -1 of the values is), unowned blocks and each context's last block past its end.
    # Any read of one makes its row NaN.
    nan = torch.full_like(cache[:, :1], float("nan"))
    poisoned = torch.cat([nan, cache, nan], dim=1)
    tables = torch.where(meta.block_tables >= 0, meta.block_tables + 1, -1)
    owned = set(tables.flatten().tolist())
    for block in range(poisoned.shape[1]):
        if block not in owned:
            poisoned[:, block] = float("nan")
    for table, context in zip(tables.tolist(), meta.context_lens.tolist(), strict=True):
        poisoned[:, table[(context - 1) // block_size], :, (context - 1) % block_size + 1 :] = (
            float("nan")
        )
    shifted = AttentionMetadata(meta.slot_mapping + block_size, meta.query_start_loc,
                                meta.context_lens, tables)  # fmt: skip
    after = _triton(q, k, v, poisoned, shifted, 0.25)
    assert torch.equal(before, after)


def test_a_decode_step_never_synchronises_with_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v, cache, meta = decode_step([5, 40, 17], 8, 2, 32, 16)
    want = TorchAttention().forward(q, k, v, cache.clone(), meta, 0.2)

    def synchronises(*_: object) -> None:
        raise AssertionError("a decode step read a tensor on the host (not graph-capturable)")

    # The reference plans with .tolist(); a CUDA graph would capture none of it.
    for method in ("tolist", "item", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, method, synchronises)
    got = _triton(q, k, v, cache.clone(), meta, 0.2)
    monkeypatch.undo()
    assert (got - want).abs().max().item() < 1e-5


def test_a_step_with_a_prefill_chunk_equals_the_reference() -> None:
    q, k, v, cache, meta = decode_step([30, 9, 17], 4, 2, 16, 4)
    # The first sequence's last three tokens are new this step: a chunk after a cached prefix,
    # so attention plans through the reference and decodes the other two with the kernel.
    table = meta.block_tables[0].tolist()
    chunk = torch.tensor([table[p // 4] * 4 + p % 4 for p in (27, 28)])
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.cat([torch.randn((2, *t.shape[1:]), generator=gen), t]) for t in (q, k, v))
    mixed = AttentionMetadata(
        slot_mapping=torch.cat([chunk, meta.slot_mapping]),
        query_start_loc=torch.tensor([0, 3, 4, 5]),
        context_lens=meta.context_lens,
        block_tables=meta.block_tables,
    )
    want = TorchAttention().forward(q, k, v, cache.clone(), mixed, 0.25)
    got = _triton(q, k, v, cache.clone(), mixed, 0.25)
    assert (got - want).abs().max().item() < 1e-5


BLOCK = 4


def _steps(model: LlamaForCausalLM) -> list[torch.Tensor]:
    """Logits of three steps: prefills, a mix of prefill chunks and decoders, all decoding."""
    rng = random.Random(0)
    prompts = [[rng.randrange(320) for _ in range(n)] for n in (13, 10, 16, 21, 1)]
    split = [(0, 13), (9, 1), (10, 6), (20, 1), (0, 1)]  # (cached before, new this step)
    free = list(range(40))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-(len(p) + 1) // BLOCK))] for p in prompts]
    caches = new_caches(model, 40, BLOCK)
    steps = run_step(model, caches, [
        Chunk(p[:c], 0, t) for p, (c, _), t in zip(prompts, split, tables, strict=True) if c
    ])  # fmt: skip
    steps += run_step(model, caches, [
        Chunk(p[c : c + n], c, t) for p, (c, n), t in zip(prompts, split, tables, strict=True)
    ])  # fmt: skip
    steps += run_step(model, caches, [
        Chunk([7], len(p), t) for p, t in zip(prompts, tables, strict=True)
    ])  # fmt: skip
    return steps


def test_a_model_gives_the_reference_logits_over_mixed_and_decode_steps() -> None:
    want = _steps(small_llama(TorchAttention()))
    got = _steps(small_llama(TritonAttention()).to(DEVICE))
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and (g.cpu() - w).abs().max().item() < 1e-5
