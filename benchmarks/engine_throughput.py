"""Output tokens/s of the bundled engine against Hugging Face transformers, side by side.

Same model, same requests, one process: our engine (continuous batching over the paged cache,
`max_num_seqs` = concurrency), transformers' `generate` in static batches of `concurrency`
(left-padded), and transformers' own continuous batching (`generate_batch`). Equal lengths are
`generate`'s best case; mixed lengths (drawn uniformly, as nano-vllm's benchmark) are where
continuous batching should win. Greedy, EOS ignored, float32 on CPU.

    python benchmarks/engine_throughput.py [--models small4 tiny moe4] [--concurrency 1 8 32]
        [--attention auto torch]   # our engine once per attention backend, side by side
        [--rounds 3]               # each figure the median of 3 interleaved measurements
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table

from runtime.attention.selection import BACKEND_ENV, BACKENDS
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.sequence import SamplingParams
from runtime.tiny import ensure_tiny

Workload = list[tuple[list[int], int]]  # (prompt ids, output tokens)


def _saved(root: Path, name: str, model: type[transformers.PreTrainedModel],
           config: transformers.PretrainedConfig) -> Path:  # fmt: skip
    torch.manual_seed(0)
    model(config).save_pretrained(root / name)
    return root / name


def _small4(root: Path) -> Path:
    """The shape of the CPU throughput targets (docs/perf.md): a 4-layer, 256-hidden Llama with
    a 4096-token vocabulary."""
    return _saved(root, "small4", transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
    ))  # fmt: skip


def _moe4(root: Path) -> Path:
    """small4's size in GPT-OSS's form: 8 experts of 256 columns, 2 a token, a 128-token
    sliding window on every other layer, sinks, YaRN."""
    return _saved(root, "moe4", transformers.GptOssForCausalLM, transformers.GptOssConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32, num_local_experts=8,
        num_experts_per_tok=2, sliding_window=128, max_position_embeddings=131072,
    ))  # fmt: skip


def _workload(n: int, mixed: bool, vocab: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    if not mixed:
        return [([rng.randrange(3, vocab) for _ in range(128)], 128) for _ in range(n)]
    return [
        ([rng.randrange(3, vocab) for _ in range(rng.randint(16, 256))], rng.randint(16, 256))
        for _ in range(n)
    ]


def _ours(path: Path, work: Workload, concurrency: int, attention: str) -> float:
    os.environ[BACKEND_ENV] = attention  # read when the engine picks its backend
    engine = Engine(EngineConfig(model=str(path), max_num_seqs=concurrency,
                                 max_num_batched_tokens=2048, num_kv_blocks=4096))  # fmt: skip
    for prompt, out in work:
        engine.add_request(prompt, SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True))
    start, tokens = time.perf_counter(), 0
    while engine.has_work():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    return tokens / (time.perf_counter() - start)


def _hf_generate(model: transformers.PreTrainedModel, work: Workload, concurrency: int) -> float:
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(work), concurrency):
        batch = work[i : i + concurrency]
        width = max(len(p) for p, _ in batch)
        # Left padding, as generate expects for decoder-only models.
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        new = max(out for _, out in batch)  # a static batch runs until its longest request ends
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)  # fmt: skip
        tokens += sum(out for _, out in batch)  # only the tokens someone asked for count
    return tokens / (time.perf_counter() - start)


def _hf_generate_batch(
    model: transformers.PreTrainedModel, work: Workload, concurrency: int
) -> float:
    out_tokens = sum(out for _, out in work)
    # One max_new_tokens for all: generate_batch has no per-request length, so give each request
    # the workload's longest and count only what was asked for (its best case, like generate's).
    gen = transformers.GenerationConfig(max_new_tokens=max(o for _, o in work), do_sample=False,
                                        eos_token_id=-1, pad_token_id=0)  # fmt: skip
    cb = transformers.ContinuousBatchingConfig(max_requests_per_batch=concurrency)
    start = time.perf_counter()
    model.generate_batch([p for p, _ in work], generation_config=gen, continuous_batching_config=cb)
    return out_tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["small4", "tiny"])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests-per-user", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="measurements of each (median shown)")
    ap.add_argument(
        "--attention",
        nargs="+",
        default=["auto"],
        choices=BACKENDS,
        help="our engine's attention backends, each measured (ratios: the first)",
    )
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ours = [f"ours ({a})" if len(args.attention) > 1 else "ours" for a in args.attention]
    table = Table(title="output tokens/s (higher is better), float32 on CPU, greedy, EOS ignored"
                  f", median of {args.rounds}")  # fmt: skip
    for col in ("model", "lengths", "users", *ours, "generate", "generate_batch",
                "ours / generate", "ours / generate_batch"):  # fmt: skip
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"small4": lambda: _small4(Path(tmp)), "moe4": lambda: _moe4(Path(tmp)),
                 "tiny": ensure_tiny}  # fmt: skip
        for name in args.models:
            path = paths[name]()
            hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
            for mixed in (False, True):
                for users in args.concurrency:
                    work = _workload(max(users * args.requests_per_user, 4), mixed,
                                     hf.config.vocab_size)  # fmt: skip
                    runs: dict[str, list[float]] = {}
                    # Rounds interleave the engines, so a noisy minute hits all of them.
                    for _ in range(args.rounds):
                        for col, attention in zip(ours, args.attention, strict=True):
                            runs.setdefault(col, []).append(_ours(path, work, users, attention))
                        runs.setdefault("generate", []).append(_hf_generate(hf, work, users))
                        runs.setdefault("generate_batch", []).append(
                            _hf_generate_batch(hf, work, users)
                        )
                    tps = {col: statistics.median(values) for col, values in runs.items()}
                    table.add_row(
                        name, "mixed" if mixed else "equal", str(users),
                        *(f"{tps[k]:,.0f}" for k in (*ours, "generate", "generate_batch")),
                        f"{tps[ours[0]] / tps['generate']:.2f}x",
                        f"{tps[ours[0]] / tps['generate_batch']:.2f}x",
                    )  # fmt: skip
                    print(name, "mixed" if mixed else "equal", users, runs, flush=True)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
