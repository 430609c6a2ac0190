"""The engine: one `step()` = schedule, run the model, sample, account. Nothing else.

Requests enter as token ids with their sampling parameters and leave as tokens; text, chat
templates and stop strings belong to the server. With tensor_parallel_size N > 1 this process
is rank 0: it schedules and samples, and each step's forward runs on all N ranks
(runtime/worker.py).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.block_manager import BlockManager
from runtime.config import EngineConfig
from runtime.loader import resolve_model
from runtime.model_runner import load_runner
from runtime.parallel import SINGLE
from runtime.quantization import weight_bytes
from runtime.sampler import Sampler
from runtime.scheduler import Scheduler, Step
from runtime.sequence import EngineStats, SamplingParams, Sequence, TokenOutput
from runtime.worker import Workers


@dataclass(frozen=True)
class LoadBreakdown:
    """Times and sizes of this process: rank 0's shard under tensor parallelism."""

    read_s: float
    place_s: float
    quantize_s: float  # float linears to int8/int4 (0 otherwise: mxfp4 quantises as it loads)
    weight_bytes: int  # the model's parameters as held, quantised ones at their packed size
    profile_s: float  # the CUDA profiling forward that sized the KV cache (0 on the CPU)
    kv_cache_s: float
    kv_cache_bytes: int
    num_kv_blocks: int  # every rank's cache holds this many blocks of its K/V heads
    graph_capture_s: float  # CUDA graphs for decode (0 on the CPU or with enforce_eager)
    warmup_s: float  # one short request end to end, so the first real one is not the slow one


class Engine:
    def __init__(self, cfg: EngineConfig) -> None:
        path, mcfg, self.max_model_len = resolve_model(cfg)  # raises before any rank starts
        self.config, self.model_config = cfg, mcfg
        # Ranks 1..N-1 (tensor parallelism); None at size 1, where no process group exists.
        self.workers = Workers.start(cfg) if cfg.tensor_parallel_size > 1 else None
        try:
            self._load(path)
        except BaseException:
            self.close()  # no worker outlives a failed start
            raise

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    def _load(self, path: Path) -> None:
        """The model, cache, scheduler and warmup: everything that may fail once ranks run."""
        cfg, mcfg = self.config, self.model_config
        tp = self.workers.tp if self.workers is not None else SINGLE
        loaded = load_runner(cfg, path, mcfg, self.max_model_len, tp)
        self.runner = loaded.runner
        # Every rank's cache has these blocks (each holding its K/V heads): one block table.
        blocks, bs = self.runner.num_blocks, cfg.block_size
        self.blocks = BlockManager(blocks, bs, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len,
            mcfg.eos_token_id,
        )  # fmt: skip
        self.sampler = Sampler(cfg.seed)
        self.seqs: dict[int, Sequence] = {}
        self.path = path
        start = time.perf_counter()
        warmup = list(range(min(16, self.max_model_len - 1)))
        self.generate([warmup], SamplingParams(max_tokens=1, temperature=0.0))
        warmup_s = time.perf_counter() - start
        kv_bytes = self.runner.kv_cache_bytes
        self.load = LoadBreakdown(
            loaded.times.read_s, loaded.times.place_s, loaded.quantize_s,
            weight_bytes(self.runner.model), loaded.profile_s, loaded.kv_cache_s, kv_bytes,
            self.runner.num_blocks, loaded.graph_capture_s, warmup_s,
        )  # fmt: skip

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if max(prompt_ids) >= self.vocab_size or min(prompt_ids) < 0:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        seq = Sequence(list(prompt_ids), params)
        self.scheduler.add(seq)  # raises if longer than max_model_len
        self.seqs[seq.seq_id] = seq
        return seq.seq_id

    def abort(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")
            self.sampler.forget(seq_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[TokenOutput]:
        step = self.scheduler.schedule()
        if not step.scheduled:
            return []
        logits = self.logits(step)
        sampling = [item.seq for item in step.scheduled if item.samples]
        ids = [s.seq_id for s in sampling]
        sampled = dict(
            zip(ids, self.sampler(logits, ids, [s.params for s in sampling]), strict=True)
        )
        self.scheduler.update(step, sampled)
        outputs = []
        for item in step.scheduled:
            seq = item.seq
            tokens = [sampled[seq.seq_id]] if item.samples else []
            outputs.append(TokenOutput(seq.seq_id, tokens, seq.is_finished, seq.finish_reason))
            if seq.is_finished:
                del self.seqs[seq.seq_id]
                self.sampler.forget(seq.seq_id)
        return outputs

    def logits(self, step: Step) -> torch.Tensor:
        """The forward of one scheduled step: float32 logits of its sampling sequences."""
        inputs = self.runner.prepare(step)
        if self.workers is None:
            logits = self.runner.execute(inputs)
            assert logits is not None  # a single rank is rank 0
            return logits
        return self.workers.execute(self.runner, inputs)

    def close(self) -> None:
        """Stop the worker ranks (tensor parallelism); nothing to do at size 1. Idempotent."""
        if self.workers is not None:
            self.workers.close()

    def stats(self) -> EngineStats:
        return EngineStats(
            len(self.scheduler.running), len(self.scheduler.waiting), self.blocks.usage,
            self.scheduler.num_preemptions, len(self.blocks.blocks), self.config.block_size,
        )  # fmt: skip

    def load_breakdown(self) -> dict[str, float]:
        return dataclasses.asdict(self.load)

    def kernels(self) -> dict[str, str]:
        return self.runner.kernels()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Offline: run prompts to completion together; their output token ids, in order."""
        ids = [self.add_request(p, params) for p in prompts]
        outputs: dict[int, list[int]] = {i: [] for i in ids}
        while self.has_work():
            for out in self.step():
                outputs[out.seq_id] += out.new_token_ids
        return [outputs[i] for i in ids]
