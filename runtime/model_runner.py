"""Turns a scheduled step into tensors, runs the model over the paged KV cache, returns logits.

Each scheduled sequence contributes its next `num_new_tokens` tokens (a prefill chunk or one
decode token) at positions num_computed .. num_computed + n - 1; their K/V go to the cache slots
its block table assigns to those positions. Logits are computed only for the last token of the
sequences that sample this step.

Under tensor parallelism every rank has a ModelRunner over its shard (its K/V heads in its
cache, the same blocks and slots on every rank); rank 0 `prepare`s the step's inputs from the
scheduler and sends them, then all ranks `execute` them (see runtime/worker.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.config import DTYPES, EngineConfig, ModelConfig
from runtime.layers.attention import AttentionBackend, AttentionMetadata, TorchAttention
from runtime.loader import LoadTimes, load_checkpoint, load_dummy
from runtime.models.llama import LlamaForCausalLM, kv_heads_per_rank
from runtime.parallel import TensorParallel
from runtime.quantization import quantize
from runtime.scheduler import Step

# Where the model runs; CPU only for now (the CUDA path is not built).
DEVICE = torch.device("cpu")
# Without a memory budget to size it from (CPU), the cache holds this many longest sequences.
CPU_CACHE_SEQUENCES = 16


@dataclass(frozen=True)
class StepInputs:
    """Everything a forward needs, and all a worker rank receives of a step."""

    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [sampling seqs]: rows of `input_ids` whose logits are wanted


@dataclass(frozen=True)
class LoadedRunner:
    runner: ModelRunner
    times: LoadTimes
    quantize_s: float  # float weights to the quantised form (0 without --quantization)
    kv_cache_s: float


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.model, self.block_size, self.device = model, block_size, device
        self.num_blocks = num_blocks
        shape = backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def kv_cache_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.kv_caches)

    def prepare(self, step: Step) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        context_lens: list[int] = []
        for item in step.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            starts.append(starts[-1] + item.num_new_tokens)
            context_lens.append(end)
        width = max(len(item.seq.block_table) for item in step.scheduled)
        tables = [item.seq.block_table + [-1] * (width - len(item.seq.block_table))
                  for item in step.scheduled]  # fmt: skip
        sample_rows = [starts[i + 1] - 1 for i, item in enumerate(step.scheduled) if item.samples]

        def tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        meta = AttentionMetadata(
            slot_mapping=tensor(slots),
            query_start_loc=tensor(starts),
            context_lens=tensor(context_lens),
            block_tables=tensor(tables),
        )
        return StepInputs(tensor(ids), tensor(positions), meta, tensor(sample_rows))

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Logits [number of sampling sequences, vocab], in the step's order; None on
        tensor-parallel ranks other than 0."""
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        return self.model.compute_logits(hidden[inputs.sample_rows])


def load_runner(
    cfg: EngineConfig, path: Path, mcfg: ModelConfig, max_model_len: int, tp: TensorParallel
) -> LoadedRunner:
    """This rank's shard of the model, loaded (and quantised, each rank its own shard), with
    its KV cache. Every rank calls it with the same arguments but `tp`."""
    dtype = mcfg.dtype if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    torch.manual_seed(cfg.seed)
    backend = TorchAttention()
    model = LlamaForCausalLM(mcfg, backend, tp).to(dtype).eval()
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
    blocks = cfg.num_kv_blocks or -(-max_model_len // bs) * CPU_CACHE_SEQUENCES
    start = time.perf_counter()
    runner = ModelRunner(
        model, backend, mcfg.num_hidden_layers, kv_heads_per_rank(mcfg, tp), mcfg.head_dim,
        blocks, bs, dtype, DEVICE,
    )  # fmt: skip
    return LoadedRunner(runner, times, quantize_s, time.perf_counter() - start)
