"""Batch-1 decode against the memory roofline: what share of the device's bandwidth it reaches.

One request decodes alone, so every step reads its active weights (and its short KV context)
once: every weight but an untied embedding table (a lookup reads one row of it) and, of a
mixture of experts, the experts the router passes over (`active_weight_bytes`). Bytes per
step / seconds per step is the bandwidth decode achieves. Beside it, the device's
own copy bandwidth (a large tensor copied device to device, read plus write), the practical
ceiling. The target on an H100/H200 is 75% of it for a Llama-3-8B shape in bf16 (not yet
measured on a GPU):

    python benchmarks/decode_bandwidth.py --model llama-3-8b          # on a GPU (dummy weights)
    python benchmarks/decode_bandwidth.py --model small               # the CPU smoke run
    python benchmarks/decode_bandwidth.py --model gpt-oss-20b --quantization mxfp4  # MoE, GPU
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from runtime.config import QUANTIZATIONS, EngineConfig
from runtime.device import engine_device
from runtime.engine import Engine
from runtime.layers.moe import Experts
from runtime.quantization import weight_bytes
from runtime.sequence import SamplingParams

PROMPT_TOKENS = 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, size_bytes: int, rounds: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting the read and the write (best round)."""
    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size_bytes / best


def decode_rate(engine: Engine, tokens: int) -> tuple[float, float]:
    """(steps/s of decode after the first token, mean KV bytes read per step) for one request."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    engine.add_request(list(range(3, 3 + PROMPT_TOKENS)), params)
    engine.step()  # the prefill, which also samples the first token
    device = engine.runner.device
    _sync(device)
    start, steps = time.perf_counter(), 0
    while engine.has_work():
        engine.step()
        steps += 1
    _sync(device)
    elapsed = time.perf_counter() - start
    per_token = engine.load.kv_cache_bytes / (engine.load.num_kv_blocks * engine.config.block_size)
    mean_context = PROMPT_TOKENS + 1 + steps / 2
    return steps / elapsed, per_token * mean_context


def active_weight_bytes(engine: Engine) -> float:
    """Bytes of weights one token's forward reads, as held (quantised ones at their packed
    size): all but an untied embedding table (a lookup reads one row) and, of a mixture of
    experts, the experts the router passes over (their share: 1 - top_k / experts)."""
    model, mcfg = engine.runner.model, engine.model_config
    expert_bytes = sum(weight_bytes(m) for m in model.modules() if isinstance(m, Experts))
    other = engine.load.weight_bytes - expert_bytes
    if not mcfg.tie_word_embeddings:
        other -= weight_bytes(model.model.embed_tokens)
    share = 1.0 if mcfg.moe is None else mcfg.moe.top_k / mcfg.moe.num_experts
    return other + expert_bytes * share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3-8b", help="a named architecture (dummy)")
    parser.add_argument("--tokens", type=int, default=128, help="output tokens to decode")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--copy-mib", type=int, default=1024, help="size of the copy test")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--quantization", default=None, choices=QUANTIZATIONS)
    args = parser.parse_args()
    device = engine_device(0)
    cfg = EngineConfig(
        model=args.model, load_format="dummy", dtype=args.dtype, max_num_seqs=1,
        max_model_len=PROMPT_TOKENS + args.tokens + 16,
        # The CPU has no memory budget to size the cache from: a few sequences' worth.
        num_kv_blocks=None if device.type == "cuda" else 64, enforce_eager=args.enforce_eager,
        quantization=args.quantization,
    )  # fmt: skip
    engine = Engine(cfg)
    steps_per_s, kv_bytes = decode_rate(engine, args.tokens)
    step_bytes = active_weight_bytes(engine) + kv_bytes
    achieved = step_bytes * steps_per_s
    ceiling = copy_bandwidth(device, args.copy_mib << 20)
    graphs = "eager" if engine.runner.graphs is None else "CUDA graphs"
    active = engine.model_config.active_parameters / 1e9
    table = Table(title=f"{args.model} (dummy weights, {active:.2f}B active parameters, "
                  f"{args.quantization or engine.model_config.dtype}), batch 1, "
                  f"{args.tokens} tokens, on {device}, {graphs}")  # fmt: skip
    for column in ("decode tok/s", "bytes/step", "achieved GB/s", "copy GB/s", "share"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{steps_per_s:,.1f}", f"{step_bytes / 1e9:,.3f} GB", f"{achieved / 1e9:,.1f}",
        f"{ceiling / 1e9:,.1f}", f"{achieved / ceiling:.0%}",
    )  # fmt: skip
    Console().print(table)
    engine.close()


if __name__ == "__main__":
    main()
