"""Int4Weight under each CPU layout of aten's int4 packing, not only the one this CPU picks.

aten packs int4 weights per CPU capability, and torch picks the capability from the
environment variable ATEN_CPU_CAPABILITY when it starts, so each layout runs in a subprocess
of its own. Measured with torch 2.13 on an AVX-512 x86 CPU: `default` packs blocks of 32 rows
with neighbouring rows in a byte, `avx2` blocks of 32 pairing row d with d + 16, `avx512`
blocks of 64 pairing d with d + 32. A capability the CPU cannot run is skipped: torch then
falls back to a lower one, which the subprocess reports.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from runtime.quantization import KERNEL_MAX_ROWS

ROOT = Path(__file__).resolve().parents[2]
BLOCK = {"default": 32, "avx2": 32, "avx512": 64}
# Rows in a partial block of 32 (40, 72) and of 64 (40, 72, 96), a whole block, and groups of
# 128 inputs (in_features 1024).
SHAPES = [(96, 256), (40, 256), (72, 128), (64, 256), (40, 1024)]
ROWS = (1, 2 * KERNEL_MAX_ROWS)  # the kernel; dequantise-then-matmul

# Prints one JSON report: the capability torch runs, the probe's block size, and per shape what
# Int4Weight returns beside quantize_int4's own values and a float matmul with their
# dequantised weight.
SCRIPT = """
import json, sys
import torch
from runtime.quantization import (Int4Weight, _int4_pack_order, dequantize_int4,
                                  int4_group_size, quantize_int4)

report = {"capability": torch.backends.cpu.get_cpu_capability(),
          "block": _int4_pack_order()[0], "shapes": {}}
gen = torch.Generator().manual_seed(0)
shapes, all_rows = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for out, width in shapes:
    w = torch.randn(out, width, generator=gen) * 0.02
    try:
        layer = Int4Weight(w)
    except ValueError as e:
        report["shapes"][f"{out}x{width}"] = {"refused": str(e)}
        continue
    q, scale, low = quantize_int4(w, int4_group_size(width))
    dense = layer.dequantize()
    reference = dequantize_int4(q, scale, low, layer.group_size)
    result = {
        "unpack_exact": torch.equal(layer.unpack(), q.to(torch.uint8)),
        "dequantized_shape": list(dense.shape),
        "dequantize_error": float((dense - reference).abs().max()),
    }
    for rows in all_rows:
        x = torch.randn(rows, width, generator=gen)
        want = x @ reference.T
        got = layer(x)
        result[f"shape_{rows}"] = list(got.shape)
        result[f"error_{rows}"] = float((got - want).abs().max() / want.abs().max())
    report["shapes"][f"{out}x{width}"] = result
print(json.dumps(report))
"""


@functools.cache
def _run(capability: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    args = [sys.executable, "-c", SCRIPT, json.dumps(SHAPES), json.dumps(ROWS)]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _report(capability: str) -> dict[str, Any]:
    """The script's report under `capability`; skips where this CPU cannot run it."""
    done = _run(capability)
    assert done.returncode == 0, f"ATEN_CPU_CAPABILITY={capability}:\n{done.stderr}"
    report: dict[str, Any] = json.loads(done.stdout)
    if report["capability"] != capability.upper():
        pytest.skip(f"this CPU runs {report['capability']} under ATEN_CPU_CAPABILITY={capability}")
    return report


@pytest.mark.parametrize("capability", list(BLOCK))
def test_the_probe_finds_the_block_of_rows_each_capability_packs(capability: str) -> None:
    assert _report(capability)["block"] == BLOCK[capability]


@pytest.mark.parametrize("capability", list(BLOCK))
def test_int4_unpacks_quantize_int4s_values_for_any_out_features(capability: str) -> None:
    shapes = _report(capability)["shapes"]
    for out, width in SHAPES:
        result = shapes[f"{out}x{width}"]
        assert "refused" not in result, result
        assert result["unpack_exact"], (out, width)
        assert result["dequantized_shape"] == [out, width]
        assert result["dequantize_error"] < 1e-6, (out, width)


@pytest.mark.parametrize("capability", list(BLOCK))
def test_int4_kernel_and_dequantised_paths_compute_the_dequantised_matmul(
    capability: str,
) -> None:
    shapes = _report(capability)["shapes"]
    for out, width in SHAPES:
        result = shapes[f"{out}x{width}"]
        assert "refused" not in result, result
        for rows in ROWS:
            assert result[f"shape_{rows}"] == [rows, out]
            assert result[f"error_{rows}"] < 1e-4, (out, width, rows)
