"""`python -m runtime serve`: the bundled engine behind its OpenAI-compatible server.

The flags are vLLM's (`vllm serve`), so a command written for vLLM carries over; the defaults
are vLLM's too except where a CPU needs smaller ones (see EngineConfig).

Serving defaults of this server's own (runtime/server.py says more):

- --max-waiting defaults to max(256, 4 x --max-num-seqs) requests waiting for a batch slot;
  more get 429 with Retry-After. 0 means unbounded.
- --api-key, else the VLLM_API_KEY environment variable, guards /v1/*; /health, /metrics and
  /openapi.json stay open. Binding a non-loopback address without a key logs a warning.
- On SIGTERM or SIGINT the server drains: new requests get 503, those in flight get up to
  --drain-timeout-s (30) to finish, then the rest are ended and it exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.config import DTYPES, QUANTIZATIONS, EngineConfig
from runtime.model_names import check_model
from runtime.parallel import torchrun_rank

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from runtime.engine import Engine

log = logging.getLogger("runtime")

EXAMPLES = """examples:
  python -m runtime serve --model tiny
  python -m runtime serve --model small --load-format dummy --max-num-seqs 64
  python -m runtime serve --model /path/to/hf-checkpoint --port 8001 --enable-prefix-caching
  python -m runtime serve --model tiny --tensor-parallel-size 2   # spawns rank 1 itself
  torchrun --nproc-per-node 2 -m runtime serve --model tiny --tensor-parallel-size 2
then:
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "The server", "max_tokens": 16}'
environment:
  RUNTIME_DEVICE=auto|cpu|cuda   where the engine runs (auto: CUDA when available)
  RUNTIME_ATTENTION_BACKEND=auto|torch|cpu-kernel|triton|flash-attn
                                 attention kernels (auto: flash-attn, else Triton on CUDA;
                                 the C kernel for float32 on the CPU; the log says which)
  RUNTIME_KERNEL_CACHE=DIR       where the C kernels for the CPU are built
                                 (~/.cache/llm-serving-bench/kernels)
  VLLM_API_KEY=KEY               the API key when --api-key is not given
"""


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default only when it has one worth showing (the help says the rest)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    d = EngineConfig(model="tiny")  # the defaults, in one place
    parser = argparse.ArgumentParser(
        prog="python -m runtime",
        description="The bundled LLM engine (continuous batching over a paged KV cache).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="serve")
    p = commands.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        formatter_class=_Help,
        epilog=EXAMPLES,
    )
    p.add_argument("model_tag", nargs="?", help="the model, as vLLM's positional form")
    p.add_argument(
        "--model", default=None,
        help="`tiny` (embedded, built on first use), a named architecture in "
        "runtime/architectures/ (with --load-format dummy), or a Hugging Face checkpoint "
        "directory (default: tiny)",
    )  # fmt: skip
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: the model's; for a named architecture "
                   "without one, tiny's)")  # fmt: skip
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: --model)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind")
    p.add_argument("--port", type=int, default=8000, help="port to bind (0: any free one)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $VLLM_API_KEY, "
                   "else none); /health, /metrics and /openapi.json stay open, as vLLM's; "
                   "without a key, binding a non-loopback --host logs a warning")  # fmt: skip
    p.add_argument("--max-waiting", type=int, default=None,
                   help="requests allowed to wait for a batch slot before new ones get 429 "
                   "with Retry-After (default: max(256, 4 x --max-num-seqs); 0: "
                   "unbounded)")  # fmt: skip
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="on SIGTERM or SIGINT, seconds that requests in flight get to finish "
                   "while new ones get 503; those still running then are ended")  # fmt: skip
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help="most requests in one batch")  # fmt: skip
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="token budget of one step, prefill and decode together")  # fmt: skip
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output (default: the model's)")  # fmt: skip
    p.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV block")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--num-kv-blocks", type=int, default=None,
                       help="KV cache size in blocks (default: sized from memory)")  # fmt: skip
    cache.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                       help="fraction of GPU memory for weights and KV cache")  # fmt: skip
    p.add_argument("--enable-prefix-caching", action="store_true",
                   help="reuse KV blocks of identical prompt prefixes")  # fmt: skip
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run decode eagerly: no CUDA graphs (captured at load otherwise)",
    )
    p.add_argument("--dtype", default=d.dtype, choices=("auto", *DTYPES))
    p.add_argument("--load-format", default=d.load_format, choices=("auto", "dummy"),
                   help="dummy: seeded random weights, no checkpoint read")  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--tensor-parallel-size", type=int, default=d.tensor_parallel_size)
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="weight-only quantisation: of the linear layers, int8 per output "
                   "channel or int4 per group; of a mixture of experts' experts, mxfp4 (as "
                   "GPT-OSS ships) (default: float weights)")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
        dtype=args.dtype,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
        load_format=args.load_format,
        quantization=args.quantization,
    )


def max_waiting(args: argparse.Namespace) -> int:
    """--max-waiting, else the server's default for --max-num-seqs."""
    from runtime.server import default_max_waiting

    if args.max_waiting is not None:
        return int(args.max_waiting)
    return default_max_waiting(args.max_num_seqs)


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key, else the VLLM_API_KEY environment variable (vLLM's), else none."""
    return args.api_key or os.environ.get("VLLM_API_KEY") or None


def load(cfg: EngineConfig, tokenizer: str | None = None) -> tuple[Engine, PreTrainedTokenizerBase]:
    """The engine and its tokenizer (heavy imports here, after the socket is up)."""
    from transformers import AutoTokenizer

    from runtime.engine import Engine
    from runtime.tiny import ensure_tiny

    engine = Engine(cfg)
    source = Path(tokenizer) if tokenizer else engine.path
    if not (source.is_dir() and (source / "tokenizer_config.json").is_file()):
        if tokenizer:
            raise ValueError(f"--tokenizer {tokenizer!r}: no tokenizer_config.json there")
        # A named architecture has shapes, not a vocabulary: tiny's tokenizer stands in, so
        # text prompts work; ids past its vocabulary decode to no text (usage still counts them).
        log.warning("%s has no tokenizer; using tiny's (pass --tokenizer to choose)", cfg.model)
        source = ensure_tiny()
    tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if len(tok) > engine.model_config.vocab_size:
        raise ValueError(
            f"the tokenizer at {source} has {len(tok)} tokens, more than the model's "
            f"vocab_size {engine.model_config.vocab_size}: pass a matching --tokenizer"
        )
    return engine, tok


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.model = args.model or args.model_tag or "tiny"
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = _engine_config(args)  # bad values fail here, before the port is taken
        check_model(cfg.model, cfg.load_format)
        if args.max_waiting is not None and args.max_waiting < 0:
            raise ValueError(f"--max-waiting: expected an integer >= 0, got {args.max_waiting}")
        if not args.drain_timeout_s >= 0:
            raise ValueError(
                f"--drain-timeout-s: expected seconds >= 0, got {args.drain_timeout_s}"
            )
        rank = torchrun_rank(cfg.tensor_parallel_size) if cfg.tensor_parallel_size > 1 else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank:  # under torchrun, ranks other than 0 only run their shard of the forward
        from runtime.worker import run_worker

        run_worker(cfg, rank, cfg.tensor_parallel_size, "env://")
        return 0
    from runtime.server import EngineFailedError, ModelLoadError, serve

    try:
        asyncio.run(
            serve(
                lambda: load(cfg, args.tokenizer),
                args.served_model_name or args.model,
                args.host,
                args.port,
                max_waiting(args),
                api_key(args),
                args.drain_timeout_s,
            )
        )
    except (ModelLoadError, EngineFailedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the port is taken
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
