"""The scheduler and block manager against a simulated paged KV cache.

The simulated model writes each computed token into its cache slot and, to sample, reads the
whole context back through the block table: if paging, prefix sharing, eviction or preemption
ever handed a sequence the wrong K/V, the context it reads differs from its tokens.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.block_manager import BlockManager
from runtime.scheduler import Scheduler, Step
from runtime.sequence import SamplingParams, Sequence, Status

BLOCK = 4
VOCAB = 50


class FakeModel:
    """Next token = a hash of the whole context, read back from the paged cache."""

    def __init__(self, manager: BlockManager) -> None:
        self.manager = manager
        self.slots: dict[tuple[int, int], int] = {}  # (block id, offset) -> token

    @staticmethod
    def slot(seq: Sequence, pos: int) -> tuple[int, int]:
        return seq.block_table[pos // BLOCK], pos % BLOCK

    def run(self, step: Step) -> dict[int, int]:
        sampled = {}
        for item in step.scheduled:
            seq = item.seq
            for pos in range(
                seq.num_computed_tokens, seq.num_computed_tokens + item.num_new_tokens
            ):
                self.slots[seq.block_table[pos // BLOCK], pos % BLOCK] = seq.token_ids[pos]
            if item.samples:
                context = [
                    self.slots[seq.block_table[p // BLOCK], p % BLOCK]
                    for p in range(seq.num_tokens)
                ]
                assert context == seq.token_ids, f"seq {seq.seq_id} read someone else's K/V"
                sampled[seq.seq_id] = hash(tuple(context)) % VOCAB
        return sampled


def _engine(
    num_blocks: int, prefix: bool, budget: int = 16, seqs: int = 4
) -> tuple[Scheduler, FakeModel]:
    manager = BlockManager(num_blocks, BLOCK, prefix)
    return Scheduler(manager, seqs, budget, max_model_len=64, eos_token_id=None), FakeModel(manager)


def _run_all(sched: Scheduler, model: FakeModel, aborts: dict[int, int] | None = None) -> int:
    steps = 0
    while sched.has_work:
        step = sched.schedule()
        assert step.scheduled, "no progress: the scheduler deadlocked"
        sched.update(step, model.run(step))
        sched.blocks.check(sched.running + list(sched.waiting))
        steps += 1
        for seq in list(sched.running) + list(sched.waiting):
            if aborts and aborts.get(seq.seq_id) == steps:
                sched.finish(seq, "abort")
        assert steps < 10_000
    return steps


def _requests(rng: random.Random, n: int, shared: bool) -> list[Sequence]:
    common = [rng.randrange(VOCAB) for _ in range(9)]
    reqs = []
    for _ in range(n):
        own = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 20))]
        prompt = (common if shared and rng.random() < 0.7 else []) + own
        reqs.append(Sequence(prompt, SamplingParams(max_tokens=rng.randrange(1, 12))))
    return reqs


def _alone(prompt: list[int], params: SamplingParams) -> list[int]:
    sched, model = _engine(num_blocks=64, prefix=False, budget=1000, seqs=1)
    seq = Sequence(list(prompt), params)
    sched.add(seq)
    _run_all(sched, model)
    return seq.output_ids


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 12),
    num_blocks=st.integers(16, 40),
    budget=st.integers(1, 24),
    prefix=st.booleans(),
    shared=st.booleans(),
    abort_some=st.booleans(),
)
def test_random_mixes_keep_every_invariant_and_free_every_block(
    seed: int, n: int, num_blocks: int, budget: int, prefix: bool, shared: bool, abort_some: bool
) -> None:
    rng = random.Random(seed)
    sched, model = _engine(num_blocks, prefix, budget)
    reqs = _requests(rng, n, shared)
    for r in reqs:
        sched.add(r)
    aborts = {r.seq_id: rng.randrange(1, 30) for r in reqs if abort_some and rng.random() < 0.3}
    _run_all(sched, model, aborts)
    assert all(r.status is Status.FINISHED for r in reqs)
    # Nothing is referenced once all requests are done; cached prefixes are free to evict.
    assert sched.blocks.num_free_blocks == num_blocks
    assert all(b.ref_count == 0 for b in sched.blocks.blocks)
    for r in reqs:
        if r.finish_reason != "abort":
            # Batched, chunked, preempted or served from the prefix cache: the same tokens.
            assert r.output_ids == _alone(r.token_ids[: r.num_prompt_tokens], r.params)


def test_tight_memory_forces_preemption_and_still_completes() -> None:
    sched, model = _engine(num_blocks=12, prefix=False, budget=64, seqs=8)
    reqs = [Sequence(list(range(i, i + 10)), SamplingParams(max_tokens=12)) for i in range(6)]
    for r in reqs:
        sched.add(r)
    _run_all(sched, model)
    assert sched.num_preemptions > 0
    for r in reqs:
        assert r.output_ids == _alone(r.token_ids[:10], r.params)


def test_long_prompt_is_prefilled_in_chunks_within_the_budget() -> None:
    sched, model = _engine(num_blocks=32, prefix=False, budget=8)
    seq = Sequence(list(range(30)), SamplingParams(max_tokens=2))
    sched.add(seq)
    sizes = []
    while sched.has_work:
        step = sched.schedule()
        assert step.num_tokens <= 8
        sizes.append(step.num_tokens)
        sched.update(step, model.run(step))
    assert sizes == [8, 8, 8, 6, 1]


def test_shared_prefix_is_served_from_the_cache() -> None:
    sched, model = _engine(num_blocks=32, prefix=True, budget=64)
    first = Sequence(list(range(13)), SamplingParams(max_tokens=1))
    sched.add(first)
    _run_all(sched, model)
    second = Sequence([*range(13), 40, 41], SamplingParams(max_tokens=1))
    sched.add(second)
    step = sched.schedule()
    assert second.num_cached_tokens == 12  # three full blocks of four
    assert step.scheduled[0].num_new_tokens == 3


def test_waiting_requests_are_admitted_in_arrival_order() -> None:
    sched, _ = _engine(num_blocks=32, prefix=False, budget=100, seqs=2)
    reqs = [Sequence([1, 2, 3], SamplingParams(max_tokens=4)) for _ in range(3)]
    for r in reqs:
        sched.add(r)
    step = sched.schedule()
    assert [s.seq for s in step.scheduled] == reqs[:2]
    assert list(sched.waiting) == reqs[2:]


def test_requests_longer_than_max_model_len_are_refused() -> None:
    sched, _ = _engine(num_blocks=32, prefix=False)
    try:
        sched.add(Sequence(list(range(60)), SamplingParams(max_tokens=10)))
    except ValueError as exc:
        assert "max_model_len (64)" in str(exc)
    else:
        raise AssertionError("accepted a request longer than max_model_len")


def test_a_block_handed_out_again_leaves_the_prefix_cache() -> None:
    sched, model = _engine(num_blocks=4, prefix=True, budget=64)
    first = Sequence(list(range(13)), SamplingParams(max_tokens=1))
    sched.add(first)
    _run_all(sched, model)  # three full blocks of `first` are now cached, and free
    other = Sequence([49] * 15, SamplingParams(max_tokens=1))
    sched.add(other)
    _run_all(sched, model)  # needs all four blocks: every cached one is evicted
    again = Sequence(list(range(13)), SamplingParams(max_tokens=1))
    assert sched.blocks.lookup_prefix(again) == []
    sched.add(again)
    _run_all(sched, model)  # the fake model checks it reads its own tokens back
    assert again.output_ids == first.output_ids
