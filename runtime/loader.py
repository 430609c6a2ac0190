"""Weights into the model: a local Hugging Face checkpoint (safetensors), or seeded dummies.

Dummy weights are a pure function of (seed, parameter name), as vLLM's `load_format=dummy`,
so every tensor-parallel rank (later) builds the same logical model without a checkpoint.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from runtime.models.llama import LlamaForCausalLM


@dataclass(frozen=True)
class LoadTimes:
    read_s: float  # checkpoint files to host tensors (or generating dummies)
    place_s: float  # into the model's parameters on their device


def _checkpoint_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def load_checkpoint(model: LlamaForCausalLM, path: Path) -> LoadTimes:
    start = time.perf_counter()
    tensors = list(_checkpoint_tensors(path))
    read = time.perf_counter()
    loaded = model.load_weights(tensors)
    missing = set(dict(model.named_parameters())) - loaded
    if missing:
        raise ValueError(f"{path} lacks weights for: {', '.join(sorted(missing)[:5])} ...")
    return LoadTimes(read - start, time.perf_counter() - read)


def _seed_of(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def load_dummy(model: LlamaForCausalLM, seed: int) -> LoadTimes:
    """Norm weights 1, biases 0, everything else N(0, 0.02), as Llama's initialisation."""
    start = time.perf_counter()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                g = torch.Generator().manual_seed(_seed_of(seed, name))
                values = torch.randn(param.shape, generator=g, dtype=torch.float32) * 0.02
                param.copy_(values)
    return LoadTimes(time.perf_counter() - start, 0.0)
