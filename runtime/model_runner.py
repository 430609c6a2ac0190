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

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import torch

from runtime.attention.interface import AttentionBackend, AttentionMetadata
from runtime.attention.selection import select_backend, triton_unusable
from runtime.config import EngineConfig, ModelConfig
from runtime.cuda_graphs import DecodeGraphs
from runtime.device import DEVICE_ENV, engine_device, model_dtype
from runtime.kv_sizing import GIB, MemoryProfile, kv_block_bytes, kv_blocks_for
from runtime.layers.activation import SiluAndMul
from runtime.layers.linear import pack_weights
from runtime.layers.moe import Experts, MoE
from runtime.layers.norm import RMSNorm
from runtime.layers.rotary import RotaryEmbedding
from runtime.loader import LoadTimes, load_checkpoint, load_dummy
from runtime.models.llama import DecoderLayer, LlamaForCausalLM, kv_heads_per_rank
from runtime.native import KernelUnavailableError, load_kernels
from runtime.parallel import TensorParallel
from runtime.quantization import METHODS, pack_int8_weights, quantize
from runtime.scheduler import Scheduled, Step
from runtime.sequence import SamplingParams, Sequence

log = logging.getLogger(__name__)

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
    quantize_s: float  # float linears to int8/int4 (0 otherwise: mxfp4 quantises as it loads)
    profile_s: float  # the CUDA profiling forward that sized the KV cache (0 on the CPU)
    kv_cache_s: float
    graph_capture_s: float  # CUDA graphs for decode (0 on the CPU or with enforce_eager)


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
        self.graphs: DecodeGraphs | None = None  # set by capture_graphs

    def kernels(self) -> dict[str, str]:
        """What computes each part of a step, as chosen at load: a fallback (no compiler, no
        Triton) shows here, and the harness records it beside the figures."""
        layer = cast(DecoderLayer, self.model.model.layers[0])  # every layer chose the same
        matmul = layer.self_attn.o_proj.matmul
        kernels = {
            "attention": layer.self_attn.backend.name,
            "linear": "torch" if matmul is None else str(matmul.kernel_name),
            "elementwise": "torch" if layer.input_layernorm.native is None else "c",
            "cuda_graphs": "off" if self.graphs is None
            else ",".join(map(str, self.graphs.sizes)),
        }  # fmt: skip
        if isinstance(layer.mlp, MoE):
            experts = layer.mlp.experts
            kernels["experts"] = ("triton-fused" if experts.fused is not None
                                  else "panel-gemm" if experts.packed else "torch")  # fmt: skip
        return kernels

    def capture_graphs(self, max_num_seqs: int, max_model_len: int) -> float:
        """Capture decode steps' CUDA graphs (runtime/cuda_graphs.py); seconds it took."""
        max_blocks = -(-max_model_len // self.block_size)
        with torch.inference_mode():
            self.graphs = DecodeGraphs(
                self.model, self.kv_caches, max_num_seqs, max_blocks, self.device
            )
        return self.graphs.capture_s

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
        hidden = None
        if self.graphs is not None:  # a decode step that fits a bucket replays its graph
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        if hidden is None:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        return self.model.compute_logits(hidden[inputs.sample_rows])


def profile_step(cfg: EngineConfig, max_model_len: int) -> tuple[Step, int]:
    """The largest step the scheduler can make, as a dummy prefill, and the blocks it writes:
    max_num_batched_tokens tokens (at most max_num_seqs sequences of max_model_len), split
    into prompts of at most max_model_len (no position past the model's rotary table), each
    prefilled whole and sampling, over consecutive blocks."""
    bs = cfg.block_size
    tokens = min(cfg.max_num_batched_tokens, cfg.max_num_seqs * max_model_len)
    lengths = [max_model_len] * (tokens // max_model_len)
    lengths += [tokens % max_model_len] if tokens % max_model_len else []
    scheduled, first = [], 0
    for n in lengths:
        seq = Sequence([0] * n, SamplingParams())
        seq.block_table = list(range(first, first + -(-n // bs)))
        first += len(seq.block_table)
        scheduled.append(Scheduled(seq, n, samples=True))
    return Step(scheduled, preempted=[]), first


def _profile_memory(
    model: LlamaForCausalLM, backend: AttentionBackend, cfg: EngineConfig, mcfg: ModelConfig,
    max_model_len: int, num_kv_heads: int, dtype: torch.dtype, device: torch.device,
) -> MemoryProfile:  # fmt: skip
    """Measure this CUDA device after loading: run the largest step once over a cache just big
    enough for it, then read the weights, the activations' peak and the non-torch memory."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(device)
    step, blocks = profile_step(cfg, max_model_len)
    probe = ModelRunner(
        model, backend, mcfg.num_hidden_layers, num_kv_heads, mcfg.head_dim, blocks,
        cfg.block_size, dtype, device,
    )  # fmt: skip
    torch.cuda.reset_peak_memory_stats(device)
    probe.execute(probe.prepare(step))
    torch.cuda.synchronize(device)
    # The probe's own cache is KV memory, not activations: it is not counted twice.
    peak = torch.cuda.max_memory_allocated(device) - weights - probe.kv_cache_bytes
    del probe
    torch.cuda.empty_cache()
    # Measured after the forward, so the CUDA context, cuBLAS and NCCL state it created (and
    # any other process on this device) are counted; torch's reserved pool is not non-torch.
    free, total = torch.cuda.mem_get_info(device)
    non_torch = total - free - torch.cuda.memory_reserved(device)
    return MemoryProfile(total, weights, max(0, peak), max(0, non_torch))


def use_cpu_kernels(model: LlamaForCausalLM, quantization: str | None) -> None:
    """Float32 on the CPU: norms, activation and rotary in runtime/csrc/elementwise.c, and
    the linear layers' float or int8 weights and the experts' packed for panel_gemm.c (int4
    keeps torch's kernel). Raises KernelUnavailableError, changing nothing, where the kernels
    cannot be built."""
    lib = load_kernels()
    for module in model.modules():
        if isinstance(module, RMSNorm | SiluAndMul | RotaryEmbedding):
            module.native = lib
        elif isinstance(module, Experts) and not module.mxfp4:
            module.pack()
    if quantization in (None, "mxfp4"):  # mxfp4 leaves the linear layers float
        pack_weights(model)
    elif quantization == "int8":
        pack_int8_weights(model)


def use_fused_experts(model: LlamaForCausalLM) -> int:
    """A CUDA model's MoE layers run their experts through moe_triton.py's kernels (no host
    synchronisation, so decode can be captured; MXFP4 weights read as such). Returns how many
    layers changed."""
    # Triton: imported only where it runs
    from runtime.layers.moe_triton import fused_experts, fused_experts_mxfp4

    layers = [m for m in model.modules() if isinstance(m, Experts)]
    for layer in layers:
        layer.fused = fused_experts_mxfp4 if layer.mxfp4 else fused_experts
    return len(layers)


def load_runner(
    cfg: EngineConfig, path: Path, mcfg: ModelConfig, max_model_len: int, tp: TensorParallel
) -> LoadedRunner:
    """This rank's shard of the model on its device (runtime/device.py), loaded (and
    quantised, each rank its own shard), with its KV cache. Every rank calls it with the same
    arguments but `tp`; on CUDA each sizes the cache from its own memory and all take the
    smallest count, as every rank's cache must have the same blocks."""
    device = engine_device(tp.rank)
    if device.type == "cuda" and cfg.quantization == "int4":
        raise ValueError(
            "quantization int4 packs weights in aten's CPU layout for a CPU kernel: use int8 "
            f"on CUDA, or {DEVICE_ENV}=cpu to run on the CPU"
        )
    dtype = model_dtype(cfg.dtype, mcfg.dtype, device)
    torch.manual_seed(cfg.seed)
    backend = select_backend(device, dtype, cfg.block_size, sinks=mcfg.attention_sinks)
    with device:  # parameters and buffers are created on the device, not copied there
        model = LlamaForCausalLM(mcfg, backend, tp, cfg.quantization).to(dtype).eval()
    if cfg.load_format == "dummy":
        times = load_dummy(model, cfg.seed)
    else:
        times = load_checkpoint(model, path if path.is_dir() else path.parent)
    quantize_s = 0.0
    if cfg.quantization in METHODS:  # mxfp4 experts were quantised as they loaded
        start = time.perf_counter()
        quantize(model, cfg.quantization)  # after loading: the loaders write float weights
        quantize_s = time.perf_counter() - start
        if mcfg.moe is not None and tp.rank == 0:
            log.warning("--quantization %s converts the attention projections only: "
                        "the experts stay %s (--quantization mxfp4 converts them)",
                        cfg.quantization, dtype)  # fmt: skip
    if mcfg.moe is not None and device.type == "cuda" and triton_unusable(device) is None:
        use_fused_experts(model)
    if device.type == "cpu" and dtype == torch.float32:
        start = time.perf_counter()
        try:
            use_cpu_kernels(model, cfg.quantization)
        except KernelUnavailableError as exc:
            if tp.rank == 0:
                log.info("the model runs torch's operators: the C kernels are unavailable: %s",
                         exc)  # fmt: skip
        times = replace(times, place_s=times.place_s + time.perf_counter() - start)
    bs, heads = cfg.block_size, kv_heads_per_rank(mcfg, tp)
    profile_s = 0.0
    if cfg.num_kv_blocks is not None:
        blocks, source = cfg.num_kv_blocks, "num_kv_blocks"
    elif device.type == "cuda":
        start = time.perf_counter()
        memory = _profile_memory(model, backend, cfg, mcfg, max_model_len, heads, dtype, device)
        block_bytes = kv_block_bytes(
            backend, mcfg.num_hidden_layers, bs, heads, mcfg.head_dim, dtype
        )
        own = kv_blocks_for(memory, cfg.gpu_memory_utilization, block_bytes,
                            min_blocks=-(-max_model_len // bs))  # fmt: skip
        blocks = tp.all_min(own, device)
        profile_s = time.perf_counter() - start
        source = (
            f"gpu_memory_utilization={cfg.gpu_memory_utilization} (rank {tp.rank}: "
            f"{memory.describe()}; {own} blocks fit, the smallest over ranks is used)"
        )
    else:
        blocks = -(-max_model_len // bs) * CPU_CACHE_SEQUENCES
        source = f"{CPU_CACHE_SEQUENCES} sequences of max_model_len={max_model_len} on the CPU"
    start = time.perf_counter()
    runner = ModelRunner(
        model, backend, mcfg.num_hidden_layers, heads, mcfg.head_dim, blocks, bs, dtype, device
    )
    kv_cache_s = time.perf_counter() - start
    if tp.rank == 0:
        log.info("KV cache: %d blocks (%.2f GiB on %s) from %s",
                 blocks, runner.kv_cache_bytes / GIB, device, source)  # fmt: skip
    graph_capture_s = 0.0
    if device.type == "cuda" and not cfg.enforce_eager and model.supports_cuda_graphs:
        graph_capture_s = runner.capture_graphs(cfg.max_num_seqs, max_model_len)
        if tp.rank == 0:
            assert runner.graphs is not None
            log.info("CUDA graphs for decode batches %s in %.1f s",
                     runner.graphs.sizes, graph_capture_s)  # fmt: skip
    elif device.type == "cuda" and tp.rank == 0:
        if cfg.enforce_eager:
            why = "enforce_eager"
        elif not backend.supports_cuda_graphs:
            why = f"{backend.name} attention cannot be captured"
        else:
            why = "the experts run torch's grouping, which synchronises with the host"
        log.info("decode runs eagerly (%s)", why)
    if tp.rank == 0:
        log.info("kernels: %s", " ".join(f"{k}={v}" for k, v in runner.kernels().items()))
    return LoadedRunner(runner, times, quantize_s, profile_s, kv_cache_s, graph_capture_s)
