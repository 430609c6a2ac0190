"""CUDA graphs for decode (runtime/cuda_graphs.py): which steps replay in which bucket, and
that a step padded to its bucket computes what it computes alone. The padding is checked on the
CPU with the backends that honour it; capture and replay themselves need a GPU."""

from __future__ import annotations

import random

import pytest
import torch

from runtime.attention.cpu_kernel import CpuKernelAttention
from runtime.attention.interface import AttentionMetadata
from runtime.attention.reference import TorchAttention
from runtime.cuda_graphs import (
    DecodeGraphs,
    StaticInputs,
    graph_batch_sizes,
    graph_size_for,
    run_batch,
)
from runtime.models.llama import LlamaForCausalLM
from tests.runtime.paged import Chunk, new_caches, run_step, small_llama, step_inputs

BLOCK = 4
MAX_BLOCKS = 16  # the static block tables' width: max_model_len 64


@pytest.mark.parametrize(
    ("max_num_seqs", "sizes"),
    [(1, [1]), (5, [1, 2, 4, 5]), (24, [1, 2, 4, 8, 16, 24]), (30, [1, 2, 4, 8, 16, 24, 30])],
)
def test_buckets_cover_every_batch_up_to_max_num_seqs(max_num_seqs: int, sizes: list[int]) -> None:
    assert graph_batch_sizes(max_num_seqs) == sizes


def test_buckets_stop_at_512() -> None:
    sizes = graph_batch_sizes(4096)
    assert sizes[-1] == 512 and sizes[:4] == [1, 2, 4, 8] and len(sizes) == 3 + 512 // 8


def _step(tokens: int, seqs: int) -> AttentionMetadata:
    """The metadata of a step of `tokens` new tokens over `seqs` sequences (shapes only)."""
    zeros = torch.zeros
    return AttentionMetadata(zeros(tokens), zeros(seqs + 1), zeros(seqs), zeros(seqs, 1))


def test_a_decode_step_replays_in_the_smallest_bucket_that_holds_it() -> None:
    sizes = graph_batch_sizes(32)
    assert graph_size_for(_step(1, 1), sizes) == 1
    assert graph_size_for(_step(3, 3), sizes) == 4
    assert graph_size_for(_step(17, 17), sizes) == 24
    assert graph_size_for(_step(32, 32), sizes) == 32


def test_steps_with_prefill_or_past_the_largest_bucket_run_eagerly() -> None:
    sizes = graph_batch_sizes(32)
    assert graph_size_for(_step(20, 3), sizes) is None  # a prefill chunk among them
    assert graph_size_for(_step(33, 33), sizes) is None


def _backends() -> list[type[TorchAttention]]:
    backends: list[type[TorchAttention]] = [CpuKernelAttention]
    try:
        from runtime.attention.triton_paged import TritonAttention
    except ImportError:
        return backends
    return [*backends, TritonAttention]


def _cached(model: LlamaForCausalLM, lengths: list[int]) -> tuple[list[torch.Tensor], list[Chunk]]:
    """A cache holding prompts of `lengths`, and the decode step that follows them."""
    rng = random.Random(0)
    free = list(range(40))
    rng.shuffle(free)
    prompts = [[rng.randrange(320) for _ in range(n)] for n in lengths]
    tables = [[free.pop() for _ in range(-(-(n + 1) // BLOCK))] for n in lengths]
    caches = new_caches(model, 40, BLOCK)
    run_step(model, caches, [Chunk(p, 0, t) for p, t in zip(prompts, tables, strict=True)])
    return caches, [
        Chunk([7 + i], n, t) for i, (n, t) in enumerate(zip(lengths, tables, strict=True))
    ]


@pytest.mark.parametrize("backend", _backends(), ids=lambda b: b.name)
def test_a_step_padded_to_its_bucket_equals_the_step_alone(backend: type[TorchAttention]) -> None:
    model = small_llama(backend(), max_positions=64)
    caches, step = _cached(model, [5, 12, 1])
    before = [c.clone() for c in caches]
    eager_caches = [c.clone() for c in caches]
    ids, positions, meta = step_inputs(step, BLOCK)
    static = StaticInputs(8, MAX_BLOCKS, torch.device("cpu"))
    with torch.inference_mode():
        want = model(ids, positions, eager_caches, meta)
        got = run_batch(model, caches, static.fill(ids, positions, meta, 8))
    assert got.shape[0] == 8
    assert (got[:3] - want).abs().max().item() < 1e-5
    assert not got.isnan().any()  # padding rows give finite rows: no NaN reaches a reduction
    # The padding rows wrote nothing: the same slots changed as in the step alone (values may
    # differ in the last bits, as a matmul of 8 rows need not round as one of 3).
    assert (
        _written(before, caches)
        == _written(before, eager_caches)
        == set(meta.slot_mapping.tolist())
    )
    assert all((a - b).abs().max().item() < 1e-5 for a, b in zip(caches, eager_caches, strict=True))


def _written(before: list[torch.Tensor], after: list[torch.Tensor]) -> set[int]:
    """The slots (block * BLOCK + offset) whose K or V changed in any layer."""
    changed = set()
    for b, a in zip(before, after, strict=True):
        # [2, blocks, kv_heads, block_size, head_dim] -> one flag per (block, offset)
        flags = (a != b).any(dim=4).any(dim=2).any(dim=0).flatten()
        changed |= set(flags.nonzero().flatten().tolist())
    return changed


def test_stale_block_table_entries_of_a_wider_step_are_never_read() -> None:
    model = small_llama(CpuKernelAttention(), max_positions=64)
    static = StaticInputs(4, MAX_BLOCKS, torch.device("cpu"))
    wide_caches, wide = _cached(model, [30, 2])
    with torch.inference_mode():
        run_batch(model, wide_caches, static.fill(*step_inputs(wide, BLOCK), 2))
        caches, narrow = _cached(model, [3, 6])  # tables 2 wide: row entries 2.. are stale
        eager = [c.clone() for c in caches]
        ids, positions, meta = step_inputs(narrow, BLOCK)
        want = model(ids, positions, eager, meta)
        got = run_batch(model, caches, static.fill(ids, positions, meta, 2))
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replaying_a_graph_equals_the_eager_step() -> None:
    from runtime.attention.triton_paged import TritonAttention

    cuda = torch.device("cuda")
    model = small_llama(TritonAttention(), max_positions=64).to(cuda)
    rng = random.Random(0)
    lengths = [5, 12, 1]
    prompts = [[rng.randrange(320) for _ in range(n)] for n in lengths]
    tables = [[3 * i, 3 * i + 1, 3 * i + 2, 3 * i + 3] for i in range(len(lengths))]
    caches = new_caches(model, 40, BLOCK)
    decode = [Chunk([7], n, t) for n, t in zip(lengths, tables, strict=True)]
    with torch.inference_mode():
        prefill = [Chunk(p, 0, t) for p, t in zip(prompts, tables, strict=True)]
        ids, positions, meta = step_inputs(prefill, BLOCK, cuda)
        model(ids, positions, caches, meta)
        eager = [c.clone() for c in caches]
        graphs = DecodeGraphs(model, caches, 8, MAX_BLOCKS, cuda)
        ids, positions, meta = step_inputs(decode, BLOCK, cuda)
        got = graphs.run(ids, positions, meta)
        want = model(ids, positions, eager, meta)
    assert got is not None and got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4
    assert all((a - b).abs().max().item() < 1e-4 for a, b in zip(caches, eager, strict=True))
