"""Which sequences run in the next step, and how many tokens of each (vLLM v1's scheme).

One token budget (`max_num_batched_tokens`) is shared by prefill and decode: running sequences
go first, oldest first, each taking what it still needs (1 token when decoding, the rest of its
prompt when prefilling, cut to the budget: chunked prefill); waiting sequences are then admitted
in arrival order while budget, `max_num_seqs` and free KV blocks last. A running sequence that
needs a block when none is free preempts the newest running sequence, which gives back all its
blocks and is recomputed later from its tokens (prompt and output so far). Admission is FIFO: a
waiting sequence that does not fit blocks those behind it, so none is starved.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from runtime.block_manager import BlockManager
from runtime.sequence import Sequence, Status


@dataclass(frozen=True)
class Scheduled:
    seq: Sequence
    num_new_tokens: int
    samples: bool  # the step reaches the end of the sequence's tokens: a new token follows


@dataclass(frozen=True)
class Step:
    scheduled: list[Scheduled]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_id: int | None,
    ) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        total = seq.num_tokens + seq.params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({seq.num_tokens} tokens) + max_tokens ({seq.params.max_tokens}) = "
                f"{total} exceeds max_model_len ({self.max_model_len})"
            )
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step:
        budget = self.max_num_batched_tokens
        scheduled: list[Scheduled] = []
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()  # the newest; never one scheduled before `seq`
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(self._scheduled(seq, n))
                budget -= n
                i += 1
                continue
            break  # `seq` itself was preempted; everything after it already was
        # A step that had to preempt has no room to admit (vLLM does the same).
        while not preempted and self.waiting and budget > 0:
            if len(self.running) >= self.max_num_seqs:
                break
            seq = self.waiting[0]
            prefix = self.blocks.lookup_prefix(seq)
            n = min(seq.num_tokens - len(prefix) * self.blocks.block_size, budget)
            if not self.blocks.can_admit(seq, prefix, n):
                break
            self.waiting.popleft()
            self.blocks.admit(seq, prefix)
            allocated = self.blocks.allocate(seq, seq.num_computed_tokens + n)
            assert allocated  # can_admit said so
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(self._scheduled(seq, n))
            budget -= n
        return Step(scheduled, preempted)

    @staticmethod
    def _scheduled(seq: Sequence, n: int) -> Scheduled:
        return Scheduled(seq, n, samples=seq.num_computed_tokens + n == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free_sequence(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, step: Step, sampled: dict[int, int]) -> list[Sequence]:
        """Account for a finished step; `sampled` maps seq id to its new token. Returns the
        sequences that finished."""
        finished = []
        for item in step.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            self.blocks.register_full_blocks(seq)
            if not item.samples:
                continue
            token = sampled[seq.seq_id]
            seq.token_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and token == self.eos_token_id:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= p.max_tokens:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence wherever it is (also for stop strings and aborts)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
