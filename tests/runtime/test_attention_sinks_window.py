"""Sliding-window attention and attention sinks (GPT-OSS) in every backend that runs on the CPU,
against `naive_attention`: a loop over each query's positions written from the definitions in
runtime/attention/interface.py (Hugging Face's eager GptOss attention)."""

from __future__ import annotations

import dataclasses
import importlib.util
import random
from collections.abc import Callable

import pytest
import torch

from runtime.attention.cpu_kernel import CpuKernelAttention
from runtime.attention.interface import AttentionBackend, AttentionMetadata
from runtime.attention.reference import TorchAttention

# Where the Triton kernels run: CUDA when there is one (compiled), else the CPU (interpreted).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _triton() -> AttentionBackend:
    from runtime.attention.triton_paged import TritonAttention

    return TritonAttention()


BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    "torch": TorchAttention,
    "cpu-kernel": CpuKernelAttention,
    "triton": _triton,
}
NO_TRITON = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
ALL = [
    "torch",
    "cpu-kernel",
    pytest.param("triton", marks=NO_TRITON),
]
# The kernel backends honour CUDA-graph padding rows (slot -1, context 0); the reference not.
KERNELS = ["cpu-kernel", pytest.param("triton", marks=NO_TRITON)]

HEADS = 8
SINKS = {
    "none": None,
    # Below and around the scores (about N(0, 1) here): the keys still carry most weight.
    "small": torch.randn(HEADS, generator=torch.Generator().manual_seed(5)) * 0.5 - 0.5,
    # e^10 outweighs every key's e^score together: outputs shrink about 1000-fold.
    "large": torch.randn(HEADS, generator=torch.Generator().manual_seed(6)) + 10.0,
    # e^100 overflows float32: only a softmax whose max includes the sink gets these heads'
    # outputs to ~0 (and the others', with sink 0, right).
    "huge": torch.tensor([100.0, 0.0] * (HEADS // 2)),
}


def step(
    seqs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int, block_size: int,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:  # fmt: skip
    """A step over a random cache with shuffled block tables: (q, k, v, cache, meta). Each
    sequence is (context after this step, new tokens: its last ones)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    need = [-(-context // block_size) for context, _ in seqs]
    free = list(range(sum(need) + 3))  # a few blocks nobody owns
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in need]
    width = max(need)
    shape = TorchAttention().kv_cache_shape(len(free) + sum(need), block_size, kv_heads, head_dim)
    slots, starts = [], [0]
    for table, (context, new) in zip(tables, seqs, strict=True):
        slots += [table[p // block_size] * block_size + p % block_size
                  for p in range(context - new, context)]  # fmt: skip
        starts.append(starts[-1] + new)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor(starts),
        context_lens=torch.tensor([context for context, _ in seqs]),
        block_tables=torch.tensor([t + [-1] * (width - len(t)) for t in tables]),
    )
    cache = torch.randn(shape, generator=gen)
    q, k, v = (
        torch.randn(len(slots), h, head_dim, generator=gen) for h in (heads, kv_heads, kv_heads)
    )
    return q, k, v, cache, meta


def naive_attention(
    q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    window: int | None, sinks: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """The definition, in float64, over a cache that already holds the step's keys and values:
    new token j of a sequence's n sits at position context - n + j and sees the keys at
    positions t <= it and, with a window W, t > it - W; its head's sink joins the softmax with
    no value. A token that sees no key outputs zeros."""
    block_size, group = cache.shape[3], q.shape[1] // cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    starts = meta.query_start_loc.tolist()
    for i, context in enumerate(meta.context_lens.tolist()):
        table = meta.block_tables[i].tolist()

        def at(which: int, t: int, kv_head: int, table: list[int] = table) -> torch.Tensor:
            return cache[which, table[t // block_size], kv_head, t % block_size].double()

        n = starts[i + 1] - starts[i]
        for j in range(n):
            pos, row = context - n + j, starts[i] + j
            seen = [t for t in range(pos + 1) if window is None or t > pos - window]
            for h in range(q.shape[1] if seen else 0):
                keys = torch.stack([at(0, t, h // group) for t in seen])
                values = torch.stack([at(1, t, h // group) for t in seen])
                logits = scale * keys @ q[row, h].double()
                if sinks is not None:
                    logits = torch.cat([logits, sinks[h : h + 1].double()])
                out[row, h] = torch.softmax(logits, dim=0)[: len(seen)] @ values
    return out


def run(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
    meta: AttentionMetadata, scale: float, window: int | None, sinks: torch.Tensor | None,
    backend: AttentionBackend | None = None,
) -> torch.Tensor:  # fmt: skip
    """`backend` (or a new one named `name`).forward, Triton's on DEVICE; the output, and
    `cache` updated, on the CPU."""
    backend = backend or BACKENDS[name]()
    device = DEVICE if name == "triton" else torch.device("cpu")
    on = [t.to(device) for t in (q, k, v, cache)]
    moved = AttentionMetadata(*(getattr(meta, f.name).to(device) for f in dataclasses.fields(meta)))
    sinks = None if sinks is None else sinks.to(device)
    out = backend.forward(*on, moved, scale, sliding_window=window, sinks=sinks)
    cache.copy_(on[3].cpu())
    return out.cpu()


def expected(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
    meta: AttentionMetadata, scale: float, window: int | None, sinks: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """naive_attention after the step's keys and values are written (by the reference's
    write, so a backend's own write cannot hide its error), on a copy of `cache`."""
    written = cache.clone()
    TorchAttention()._write(k, v, written, meta.slot_mapping)
    return naive_attention(q, written, meta, scale, window, sinks)


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    # Relative as well as absolute: a dominating sink makes outputs about 1e-3.
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_the_naive_definition_by_hand() -> None:
    # One sequence, block size 1: keys at positions 0..2, the query at 2 (a decode), one head.
    cache = torch.zeros(2, 3, 1, 1, 1)
    cache[0, :, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0])  # scores are scale * key
    cache[1, :, 0, 0, 0] = torch.tensor([10.0, 20.0, 30.0])
    meta = AttentionMetadata(torch.tensor([2]), torch.tensor([0, 1]), torch.tensor([3]),
                             torch.tensor([[0, 1, 2]]))  # fmt: skip
    q, sink = torch.ones(1, 1, 1), torch.tensor([0.5])
    e = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.float64).exp()  # keys, then the sink
    full = naive_attention(q, cache, meta, 1.0, None, None)
    assert full.item() == pytest.approx((10 * e[0] + 20 * e[1] + 30 * e[2]) / e[:3].sum())
    windowed = naive_attention(q, cache, meta, 1.0, 2, sink)  # keys at 1 and 2, and the sink
    assert windowed.item() == pytest.approx((20 * e[1] + 30 * e[2]) / (e[1] + e[2] + e[3]))


# Block size 4: windows within a block, of one block, over several, and beyond every context.
WINDOWS = [None, 1, 3, 4, 10, 64]


@pytest.mark.parametrize("sinks", SINKS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("backend", ALL)
def test_decode_equals_the_definition(backend: str, window: int | None, sinks: str) -> None:
    # Contexts of one token, within a block, a block exactly, a block and one, several blocks.
    seqs = [(c, 1) for c in (1, 3, 4, 5, 9, 17, 30)]
    q, k, v, cache, meta = step(seqs, HEADS, 2, 16, 4)
    want = expected(q, k, v, cache, meta, 0.25, window, SINKS[sinks])
    assert_matches(run(backend, q, k, v, cache, meta, 0.25, window, SINKS[sinks]), want)


@pytest.mark.parametrize("sinks", SINKS)
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("backend", ALL)
def test_a_mixed_step_equals_the_definition(backend: str, window: int | None, sinks: str) -> None:
    # A prefill chunk after a cached prefix (ending mid-block), decoders, a whole prompt, and a
    # chunk longer than the smaller windows.
    seqs = [(30, 3), (9, 1), (17, 1), (6, 6), (21, 12)]
    q, k, v, cache, meta = step(seqs, HEADS, 2, 16, 4)
    want = expected(q, k, v, cache, meta, 0.25, window, SINKS[sinks])
    assert_matches(run(backend, q, k, v, cache, meta, 0.25, window, SINKS[sinks]), want)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "block_size"),
    # GQA groups 1, 8 and 3 (the last through the C kernel's general loop), head dims with
    # their own compiled loops (32, 64) and without (24); windows of 5 inside blocks of 16.
    [(8, 8, 32, 16), (8, 1, 24, 16), (6, 2, 64, 16), (8, 4, 32, 6)],
)
@pytest.mark.parametrize("backend", ALL)
def test_gqa_groups_take_their_own_heads_sinks(
    backend: str, heads: int, kv_heads: int, head_dim: int, block_size: int
) -> None:
    sinks = torch.linspace(-2.0, 3.0, heads)  # one distinct sink per query head
    seqs = [(1, 1), (16, 1), (17, 1), (40, 1), (23, 4)]
    q, k, v, cache, meta = step(seqs, heads, kv_heads, head_dim, block_size)
    want = expected(q, k, v, cache, meta, head_dim**-0.5, 5, sinks)
    assert_matches(run(backend, q, k, v, cache, meta, head_dim**-0.5, 5, sinks), want)


@pytest.mark.parametrize("backend", ALL)
def test_layers_alternating_windows_over_one_step_each_get_their_own(backend: str) -> None:
    # GPT-OSS alternates windowed and full layers; the reference plans a step once, per `meta`.
    q, k, v, cache, meta = step([(30, 3), (9, 1), (17, 1)], HEADS, 2, 16, 4)
    attention = BACKENDS[backend]()
    for window, sinks in [(4, SINKS["small"]), (None, None), (4, None), (None, SINKS["small"])]:
        want = expected(q, k, v, cache, meta, 0.25, window, sinks)
        got = run(backend, q, k, v, cache.clone(), meta, 0.25, window, sinks, attention)
        assert_matches(got, want)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("backend", KERNELS)
def test_an_empty_context_with_sinks_outputs_zeros(backend: str, window: int | None) -> None:
    q, k, v, cache, meta = step([(5, 1), (17, 1)], HEADS, 2, 16, 4)
    # One more sequence as a CUDA-graph batch pads: slot -1, no context, no blocks; NaN inputs
    # show any use of them reaching out.
    padded = AttentionMetadata(
        slot_mapping=torch.cat([meta.slot_mapping, torch.tensor([-1])]),
        query_start_loc=torch.arange(4),
        context_lens=torch.cat([meta.context_lens, torch.tensor([0])]),
        block_tables=torch.cat([meta.block_tables, torch.full_like(meta.block_tables[:1], -1)]),
    )
    q, k, v = (torch.cat([t, torch.full_like(t[:1], float("nan"))]) for t in (q, k, v))
    got = run(backend, q, k, v, cache, padded, 0.25, window, SINKS["large"])
    assert torch.equal(got[-1], torch.zeros_like(got[-1]))
    want = expected(q[:-1], k[:-1], v[:-1], cache, meta, 0.25, window, SINKS["large"])
    assert_matches(got[:-1], want)


@pytest.mark.parametrize("block_size", [4, 16, 6])
@pytest.mark.parametrize("backend", KERNELS)
def test_a_windowed_decode_reads_no_key_before_its_window(backend: str, block_size: int) -> None:
    window = 7
    q, k, v, cache, meta = step([(c, 1) for c in (5, 40, 23, 8)], HEADS, 2, 16, block_size)
    before = run(backend, q, k, v, cache.clone(), meta, 0.25, window, SINKS["small"])
    # NaN in every slot before each context's window: whole blocks and the start of the block
    # where the window begins. A kernel that reads one, even to weigh it 0, outputs NaN.
    poisoned = cache.clone()
    for table, context in zip(meta.block_tables.tolist(), meta.context_lens.tolist(), strict=True):
        for p in range(context - window):
            poisoned[:, table[p // block_size], :, p % block_size] = float("nan")
    after = run(backend, q, k, v, poisoned, meta, 0.25, window, SINKS["small"])
    assert torch.equal(before, after)


def test_a_window_below_one_is_refused() -> None:
    q, k, v, cache, meta = step([(5, 1)], HEADS, 2, 16, 4)
    with pytest.raises(ValueError, match="sliding_window must be at least 1"):
        TorchAttention().forward(q, k, v, cache, meta, 0.25, sliding_window=0)


def test_sinks_must_be_one_per_query_head() -> None:
    q, k, v, cache, meta = step([(5, 1)], HEADS, 2, 16, 4)
    with pytest.raises(ValueError, match=r"one logit per query head, shape \(8,\)"):
        CpuKernelAttention().forward(q, k, v, cache, meta, 0.25, sinks=torch.zeros(2))
