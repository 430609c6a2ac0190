"""A deterministic `EngineCore` for server tests: the real scheduler and block manager, no model.

Output token i of a request is its prompt's token i, cyclically (an echo), so every expected
output follows from the prompt alone. Admission, chunked prefill, max_tokens, EOS,
stop_token_ids, aborts and KV blocks are the real scheduler's. Prefill chunks that do not
sample yet are reported as outputs without tokens, which is what lets the server time
prefill exactly.
"""

from __future__ import annotations

import time

from runtime.block_manager import BlockManager
from runtime.scheduler import Scheduler
from runtime.sequence import EngineStats, SamplingParams, Sequence, TokenOutput


class FakeCore:
    def __init__(
        self,
        max_model_len: int = 256,
        max_num_seqs: int = 8,
        max_num_batched_tokens: int = 512,
        num_kv_blocks: int = 256,
        block_size: int = 4,
        eos_token_id: int | None = None,
        step_s: float = 0.0,
        vocab_size: int = 32000,
    ) -> None:
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.blocks = BlockManager(num_kv_blocks, block_size, enable_prefix_caching=False)
        self.scheduler = Scheduler(
            self.blocks, max_num_seqs, max_num_batched_tokens, max_model_len, eos_token_id
        )
        self.step_s = step_s  # stands in for the model's compute
        self.seqs: dict[int, Sequence] = {}
        self.aborted: list[int] = []  # seq ids, in the order the server aborted them
        self.fail_next_step = False  # simulate a crash inside the engine

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        seq = Sequence(list(prompt_ids), params)
        self.scheduler.add(seq)  # raises ValueError past max_model_len
        self.seqs[seq.seq_id] = seq
        return seq.seq_id

    def abort(self, seq_id: int) -> None:
        self.scheduler.finish(self.seqs.pop(seq_id), "abort")
        self.aborted.append(seq_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[TokenOutput]:
        if self.fail_next_step:
            raise RuntimeError("simulated failure inside the engine step")
        time.sleep(self.step_s)
        step = self.scheduler.schedule()
        sampled = {item.seq.seq_id: _echo(item.seq) for item in step.scheduled if item.samples}
        self.scheduler.update(step, sampled)
        outputs = []
        for item in step.scheduled:
            seq = item.seq
            tokens = [sampled[seq.seq_id]] if item.samples else []
            outputs.append(TokenOutput(seq.seq_id, tokens, seq.is_finished, seq.finish_reason))
            if seq.is_finished:
                del self.seqs[seq.seq_id]
        return outputs

    def close(self) -> None:
        pass  # holds nothing beyond this process

    def load_breakdown(self) -> dict[str, float]:
        return {"read_s": 0.0}

    def kernels(self) -> dict[str, str]:
        return {"attention": "fake"}

    def stats(self) -> EngineStats:
        return EngineStats(
            len(self.scheduler.running),
            len(self.scheduler.waiting),
            self.blocks.usage,
            self.scheduler.num_preemptions,
            len(self.blocks.blocks),
            self.blocks.block_size,
        )


def _echo(seq: Sequence) -> int:
    return seq.token_ids[seq.num_output_tokens % seq.num_prompt_tokens]
