"""Engine and model configuration: vLLM's knob names, validated where they are set."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
ARCHITECTURES_DIR = Path(__file__).resolve().parent / "architectures"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANTIZATIONS = ("int8", "int4")  # weight-only; see runtime/quantization.py


@dataclass(frozen=True)
class ModelConfig:
    """The Llama family's shape, read from a Hugging Face config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None  # {"rope_type": "llama3" | "linear", ...}
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2: biases on q/k/v
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k
    dtype: torch.dtype
    eos_token_id: int | None

    @property
    def num_parameters(self) -> int:
        h, layers = self.hidden_size, self.num_hidden_layers
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attention = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.attention_bias else 0)
        attention += 2 * self.head_dim if self.qk_norm else 0
        mlp = 3 * h * self.intermediate_size
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers * (attention + mlp + 2 * h) + embeddings + h

    def check_tensor_parallel(self, size: int) -> None:
        """Raise unless the model shards evenly over `size` ranks: query heads and MLP columns
        split evenly, and K/V heads either split evenly or (fewer K/V heads than ranks) each
        replicated on a whole number of ranks, so a rank's query heads all read one copy."""
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if heads % size or self.intermediate_size % size or (kv % size and size % kv):
            raise ValueError(
                f"tensor_parallel_size {size} does not divide this model: it needs to divide "
                f"num_attention_heads ({heads}) and intermediate_size "
                f"({self.intermediate_size}), and to divide or be a multiple of "
                f"num_key_value_heads ({kv}); choose a tensor_parallel_size that does"
            )

    @classmethod
    def from_hf(cls, source: str | Path | Mapping[str, Any]) -> ModelConfig:
        """From a checkpoint directory, a config.json path, or its parsed contents."""
        if isinstance(source, Mapping):
            raw = dict(source)
        else:
            path = Path(source)
            raw = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        arch = (raw.get("architectures") or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
            )
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        heads = int(raw["num_attention_heads"])
        eos = raw.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", arch == "Qwen2ForCausalLM")),
            qk_norm=arch == "Qwen3ForCausalLM",
            dtype=DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype")), torch.float32),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )


def named_architecture(name: str) -> Path | None:
    """The config.json of a named architecture under runtime/architectures/, if one exists."""
    path = ARCHITECTURES_DIR / f"{name}.json"
    return path if path.is_file() else None


@dataclass(frozen=True)
class EngineConfig:
    model: str  # a named architecture (tiny, small, llama-3-8b, ...) or a checkpoint directory
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from memory (gpu_memory_utilization on GPU)
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = False
    dtype: str = "auto"
    seed: int = 0
    enforce_eager: bool = False
    tensor_parallel_size: int = 1  # ranks sharing every layer; > 1 starts worker processes
    load_format: str = "auto"
    quantization: str | None = None  # None (float weights) or one of QUANTIZATIONS

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name}: expected {allowed}, got {getattr(self, name)!r}")

        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise bad(name, "an integer >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise bad("max_model_len", "an integer >= 1 or None")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise bad("num_kv_blocks", "an integer >= 1 or None")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise bad("gpu_memory_utilization", "a fraction in (0, 1]")
        if self.dtype not in ("auto", *DTYPES):
            raise bad("dtype", "one of auto, " + ", ".join(DTYPES))
        if self.tensor_parallel_size < 1:
            raise bad("tensor_parallel_size", "an integer >= 1")
        if self.load_format not in ("auto", "dummy"):
            raise bad("load_format", "auto or dummy")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise bad("quantization", "None (float weights) or one of " + ", ".join(QUANTIZATIONS))
