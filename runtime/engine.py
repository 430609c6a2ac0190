"""The engine: one `step()` = schedule, run the model, sample, account. Nothing else.

Requests enter as token ids with their sampling parameters and leave as tokens; text, chat
templates and stop strings belong to the server.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.block_manager import BlockManager
from runtime.config import DTYPES, EngineConfig, ModelConfig, named_architecture
from runtime.layers.attention import TorchAttention
from runtime.loader import load_checkpoint, load_dummy
from runtime.model_runner import ModelRunner
from runtime.models.llama import LlamaForCausalLM
from runtime.quantization import quantize, weight_bytes
from runtime.sampler import Sampler
from runtime.scheduler import Scheduler
from runtime.sequence import EngineStats, SamplingParams, Sequence, TokenOutput
from runtime.tiny import ensure_tiny

# Without a memory budget to size it from (CPU), the cache holds this many longest sequences.
CPU_CACHE_SEQUENCES = 16


@dataclass(frozen=True)
class LoadBreakdown:
    read_s: float
    place_s: float
    quantize_s: float  # float weights to the quantised form (0 without --quantization)
    weight_bytes: int  # the model's parameters as held, quantised ones at their packed size
    kv_cache_s: float
    kv_cache_bytes: int
    warmup_s: float  # one short request end to end, so the first real one is not the slow one


def resolve_model(cfg: EngineConfig) -> tuple[Path, ModelConfig]:
    """Where the model's config (and, unless dummy, weights and tokenizer) live."""
    if cfg.model == "tiny":
        path = ensure_tiny()
    elif (named := named_architecture(cfg.model)) is not None:
        if cfg.load_format != "dummy":
            raise ValueError(
                f"{cfg.model!r} is a named architecture without weights: use "
                "--load-format dummy, or pass a checkpoint directory"
            )
        path = named
    else:
        path = Path(cfg.model)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"--model {cfg.model!r} is neither `tiny`, a named architecture in "
                "runtime/architectures/, nor a directory with a config.json"
            )
    return path, ModelConfig.from_hf(path)


class Engine:
    def __init__(self, cfg: EngineConfig) -> None:
        path, mcfg = resolve_model(cfg)
        dtype = mcfg.dtype if cfg.dtype == "auto" else DTYPES[cfg.dtype]
        self.config, self.model_config = cfg, mcfg
        self.max_model_len = cfg.max_model_len or mcfg.max_position_embeddings
        if self.max_model_len > mcfg.max_position_embeddings:
            # Positions past the model's own limit have no rotary angles (nor training).
            raise ValueError(
                f"max_model_len: expected at most the model's max_position_embeddings "
                f"({mcfg.max_position_embeddings}), got {self.max_model_len}"
            )
        torch.manual_seed(cfg.seed)
        backend = TorchAttention()
        model = LlamaForCausalLM(mcfg, backend).to(dtype).eval()
        if cfg.load_format == "dummy":
            times = load_dummy(model, cfg.seed)
        else:
            times = load_checkpoint(model, path if path.is_dir() else path.parent)
        quantize_s = 0.0
        if cfg.quantization is not None:
            start = time.perf_counter()
            quantize(model, cfg.quantization)  # after loading: the loaders write float weights
            quantize_s = time.perf_counter() - start
        bs = cfg.block_size
        blocks = cfg.num_kv_blocks or -(-self.max_model_len // bs) * CPU_CACHE_SEQUENCES
        start = time.perf_counter()
        self.runner = ModelRunner(
            model, backend, mcfg.num_hidden_layers, mcfg.num_key_value_heads, mcfg.head_dim,
            blocks, bs, dtype, torch.device("cpu"),
        )  # fmt: skip
        kv_cache_s = time.perf_counter() - start
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
            times.read_s, times.place_s, quantize_s, weight_bytes(model), kv_cache_s, kv_bytes,
            warmup_s,
        )  # fmt: skip

    def add_request(self, prompt_ids: list[int], params: SamplingParams) -> int:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if max(prompt_ids) >= self.model_config.vocab_size or min(prompt_ids) < 0:
            raise ValueError(f"prompt token ids must be in [0, {self.model_config.vocab_size})")
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
        logits = self.runner.run(step)
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

    def stats(self) -> EngineStats:
        return EngineStats(
            len(self.scheduler.running), len(self.scheduler.waiting), self.blocks.usage,
            self.scheduler.num_preemptions, len(self.blocks.blocks),
        )  # fmt: skip

    def load_breakdown(self) -> dict[str, float]:
        return dataclasses.asdict(self.load)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Offline: run prompts to completion together; their output token ids, in order."""
        ids = [self.add_request(p, params) for p in prompts]
        outputs: dict[int, list[int]] = {i: [] for i in ids}
        while self.has_work():
            for out in self.step():
                outputs[out.seq_id] += out.new_token_ids
        return [outputs[i] for i in ids]
