"""Weights into the model: a local Hugging Face checkpoint (safetensors), or seeded dummies.

Dummy weights are a pure function of (seed, parameter name), as vLLM's `load_format=dummy`,
so every tensor-parallel rank builds the same logical model without a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from runtime.config import EngineConfig, ModelConfig
from runtime.layers.moe import check_mxfp4_groups
from runtime.layers.weight_loader import float_loader, float_name, logical_shape
from runtime.model_names import check_model, named_architecture
from runtime.models.llama import LlamaForCausalLM
from runtime.tiny import ensure_tiny


def resolve_model(cfg: EngineConfig) -> tuple[Path, ModelConfig, int]:
    """Where the model's config (and, unless dummy, weights and tokenizer) live, its shape,
    and the max_model_len to serve it at; raises if the config does not fit the model."""
    check_model(cfg.model, cfg.load_format)
    path = (
        ensure_tiny() if cfg.model == "tiny" else named_architecture(cfg.model) or Path(cfg.model)
    )
    mcfg = ModelConfig.from_hf(path)
    max_model_len = cfg.max_model_len or mcfg.max_position_embeddings
    if max_model_len > mcfg.max_position_embeddings:
        # Positions past the model's own limit have no rotary angles (nor training).
        raise ValueError(
            f"max_model_len: expected at most the model's max_position_embeddings "
            f"({mcfg.max_position_embeddings}), got {max_model_len}"
        )
    mcfg.check_tensor_parallel(cfg.tensor_parallel_size)
    if cfg.quantization == "mxfp4":
        _check_mxfp4(mcfg, cfg.tensor_parallel_size, cfg.model)
    return path, mcfg, max_model_len


def _check_mxfp4(mcfg: ModelConfig, ranks: int, name: str) -> None:
    if mcfg.moe is None:
        raise ValueError(
            f"quantization mxfp4 stores a mixture of experts' experts in MXFP4; {name} has no "
            "experts: use int8 or int4"
        )
    check_mxfp4_groups(mcfg, ranks)


@dataclass(frozen=True)
class LoadTimes:
    read_s: float  # checkpoint files to host tensors (or generating dummies)
    place_s: float  # into the model's parameters on their device, in the layout they run in


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        # Sharded: the index is the authority (a directory can hold other exports beside it).
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {path}: expected a Hugging Face checkpoint directory "
            "(config.json and model.safetensors, or shards with model.safetensors.index.json)"
        )
    return files


def load_checkpoint(model: LlamaForCausalLM, path: Path) -> LoadTimes:
    """Tensor by tensor, so the host never holds more than one beside the model."""
    read_s = 0.0

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal read_s
        for file in _checkpoint_files(path):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    start = time.perf_counter()
                    tensor = f.get_tensor(name)
                    read_s += time.perf_counter() - start
                    yield name, tensor

    start = time.perf_counter()
    whole = model.load_weights(tensors())
    total_s = time.perf_counter() - start
    missing = sorted(set(dict(model.named_parameters())) - whole)
    if missing:
        raise ValueError(
            f"{path} lacks weights (or shards of fused ones) for {len(missing)} parameters: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return LoadTimes(read_s, total_s - read_s)


def _seed_of(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def _draw(seed: int, name: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    g = torch.Generator(device).manual_seed(_seed_of(seed, name))
    return torch.randn(shape, generator=g, device=device).mul_(0.02)


def load_dummy(model: LlamaForCausalLM, seed: int) -> LoadTimes:
    """Norm weights 1, biases 0, everything else N(0, 0.02), as Llama's initialisation.

    A sharded parameter draws the whole logical tensor and keeps its rank's slice through its
    own loader, so every tensor-parallel size builds the same model (at a cost of drawing the
    whole tensor on every rank; dummy weights are for shapes and speed, not load time).
    Values are drawn on the parameter's device: a CPU draws about 150M values a second on one
    core, which is a minute for an 8B model and over two for GPT-OSS-20B, against
    milliseconds on a GPU. A CUDA generator's values differ from the CPU's (and may differ
    between GPU models), so a dummy model is the same across ranks and runs on one kind of
    device, not across kinds."""
    start = time.perf_counter()
    device = next(model.parameters()).device  # one rank, one device
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            elif (quantized := float_loader(param)) is not None:
                # The float weight's own draw, so a quantised build holds the float one's values
                # quantised (weight_loader.py names the parts).
                load, shape = quantized
                load(_draw(seed, float_name(name), shape, device))
            elif param.is_floating_point():
                values = _draw(seed, name, logical_shape(param), device)
                param.weight_loader(param, values, None)  # type: ignore[attr-defined]
            # else another part of a quantised weight, filled with its first
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # so read_s is the drawing, not its queueing
    return LoadTimes(time.perf_counter() - start, 0.0)
