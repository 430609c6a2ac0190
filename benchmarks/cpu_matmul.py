"""The CPU float32 linear layers' matmul: torch's (MKL) against the engine's packed-panel
kernel (runtime/csrc/panel_gemm.c), side by side, at decode's and prefill's row counts.

One pass is every linear layer of a model's forward (q/k/v, o, gate/up, down per layer, and the
LM head), each weight a distinct tensor as in the model, so weights stream from memory as they
do in a step. Rounds interleave the two, and each figure is the fastest round (the least
disturbed by a shared machine).

    python benchmarks/cpu_matmul.py [--model tiny] [--rows 1 4 8 32 64 256 1024] [--rounds 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from runtime.config import EngineConfig
from runtime.layers.linear import PanelWeight
from runtime.loader import resolve_model


def _shapes(model: str) -> list[tuple[int, int]]:
    """(out, in) of every matmul in one forward of `model`, as the engine resolves the name."""
    _, cfg, _ = resolve_model(EngineConfig(model=model, load_format="dummy"))
    hidden, head = cfg.hidden_size, cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * head
    layer = [(qkv, hidden), (hidden, cfg.num_attention_heads * head),
             (2 * cfg.intermediate_size, hidden), (hidden, cfg.intermediate_size)]  # fmt: skip
    return layer * cfg.num_hidden_layers + [(cfg.vocab_size, hidden)]


def _time(one_pass: Callable[[], object], repeats: int) -> float:
    one_pass()  # warm
    start = time.perf_counter()
    for _ in range(repeats):
        one_pass()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny", help="as `python -m runtime serve --model`")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 256, 1024])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(out, width) for out, width in _shapes(args.model)]
    packed = [PanelWeight(w) for w in weights]
    flops_per_row = 2 * sum(w.numel() for w in weights)
    table = Table(title=f"{args.model}: one forward's linear layers, float32, "
                  f"{torch.get_num_threads()} threads, fastest of {args.rounds}")  # fmt: skip
    for col in ("rows", "torch (MKL) ms", "panel kernel ms", "speed-up", "panel GFLOP/s"):
        table.add_column(col, justify="right")
    for rows in args.rows:
        xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
        repeats = max(3, 2000 // rows)

        def mkl(xs: dict[int, torch.Tensor] = xs) -> None:
            for w in weights:
                F.linear(xs[w.shape[1]], w)

        def panel(xs: dict[int, torch.Tensor] = xs) -> None:
            for w, p in zip(weights, packed, strict=True):
                p(xs[w.shape[1]])

        best = {"mkl": float("inf"), "panel": float("inf")}
        for _ in range(args.rounds):
            best["mkl"] = min(best["mkl"], _time(mkl, repeats))
            best["panel"] = min(best["panel"], _time(panel, repeats))
        table.add_row(str(rows), f"{best['mkl'] * 1e3:.2f}", f"{best['panel'] * 1e3:.2f}",
                      f"{best['mkl'] / best['panel']:.2f}x",
                      f"{rows * flops_per_row / best['panel'] / 1e9:.0f}")  # fmt: skip
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
