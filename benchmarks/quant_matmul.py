"""Decode- and prefill-shaped matmuls, float vs the int8/int4 weight-only builds, on this CPU.

For each shape [rows, in] x [in, out]: the float32 matmul (torch's, and the engine's panel
kernel that a float32 CPU model runs), and each quantised weight through its paths
(runtime/quantization.py): torch's weight-only kernel (used up to KERNEL_MAX_ROWS rows),
dequantise-then-matmul (used above), and for int8 the panel kernel, which a float32 CPU
engine runs instead of both. Time is the best of several
rounds (other processes only ever add time); beside it the weight bytes the call must read
and the bandwidth that implies, the roofline of a memory-bound decode matmul.

    python benchmarks/quant_matmul.py [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from runtime import quantization
from runtime.layers.linear import PanelWeight
from runtime.quantization import Int4Weight, Int8PanelWeight, Int8Weight, weight_bytes

SHAPES = [(1, 256, 768), (32, 256, 768), (1, 4096, 4096), (32, 4096, 4096)]


def best_us(fn: Callable[[], torch.Tensor], budget_s: float = 0.5, rounds: int = 5) -> float:
    fn()
    start = time.perf_counter()
    fn()
    reps = max(1, int(budget_s / rounds / max(time.perf_counter() - start, 1e-6)))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return best * 1e6


def forced(weight: Int8Weight | Int4Weight, x: torch.Tensor, kernel: bool) -> torch.Tensor:
    """The weight's forward with its path forced, whatever the row count."""
    saved = quantization.KERNEL_MAX_ROWS
    quantization.KERNEL_MAX_ROWS = x.shape[0] if kernel else 0
    try:
        return weight(x)  # type: ignore[no-any-return]
    finally:
        quantization.KERNEL_MAX_ROWS = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    table = Table(title=f"weight-only matmul, {args.threads} thread(s), best of 5")
    for col in ("rows x in x out", "weight", "path", "us", "x float", "weight MB", "GB/s"):
        table.add_column(col, justify="left" if col in ("weight", "path") else "right")
    with torch.no_grad():
        for rows, width, out in SHAPES:
            w = torch.randn(out, width) * 0.02
            x = torch.randn(rows, width)
            float_us = best_us(functools.partial(F.linear, x, w))
            cases: list[tuple[str, str, float, int]] = [
                ("float32", "dense", float_us, w.numel() * w.element_size()),
                ("float32", "panel", best_us(functools.partial(PanelWeight(w), x)),
                 w.numel() * w.element_size()),
            ]  # fmt: skip
            for name, cls in (("int8", Int8Weight), ("int4", Int4Weight)):
                q = cls(w)
                size = weight_bytes(q)
                for path, kernel in (("kernel", True), ("dequantise", False)):
                    us = best_us(functools.partial(forced, q, x, kernel))
                    cases.append((name, path, us, size))
                if isinstance(q, Int8Weight):
                    panel = Int8PanelWeight(q)
                    us = best_us(functools.partial(panel, x))
                    cases.append((name, "panel", us, weight_bytes(panel)))
            for name, path, us, size in cases:
                table.add_row(
                    f"{rows} x {width} x {out}", name, path, f"{us:,.0f}",
                    f"{us / float_us:.1f}", f"{size / 1e6:.2f}", f"{size / us / 1e3:.1f}",
                )  # fmt: skip
            table.add_section()
    Console().print(table)


if __name__ == "__main__":
    main()
