"""Engine and model configuration: vLLM's knob names, validated where they are set."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GptOssForCausalLM")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Weight-only: int8 and int4 the linear layers (runtime/quantization.py), mxfp4 a mixture of
# experts' experts, as OpenAI ships GPT-OSS (runtime/layers/mxfp4.py).
QUANTIZATIONS = ("int8", "int4", "mxfp4")


@dataclass(frozen=True)
class MoEConfig:
    """A mixture-of-experts MLP (GPT-OSS): each token runs `top_k` of `num_experts` experts,
    each a SwiGLU of `intermediate_size` columns, clamped at `swiglu_limit`."""

    num_experts: int
    top_k: int
    swiglu_alpha: float  # the gate's sigmoid gain: gate * sigmoid(alpha * gate)
    swiglu_limit: float


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-style decoder (Llama, Qwen2, Qwen3, GPT-OSS), read from a Hugging
    Face config.json."""

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
    # GPT-OSS: o_proj has a bias too, each query head a learned softmax sink, and the layers
    # named "sliding_attention" in layer_types see only the last sliding_window positions.
    o_proj_bias: bool = False
    attention_sinks: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # empty: every layer full attention
    moe: MoEConfig | None = None  # None: a dense SwiGLU MLP

    def window_of(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None where it attends to every position."""
        sliding = self.layer_types and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    @property
    def num_parameters(self) -> int:
        h, layers, heads = self.hidden_size, self.num_hidden_layers, self.num_attention_heads
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attention = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.attention_bias else 0)
        attention += 2 * self.head_dim if self.qk_norm else 0
        attention += (h if self.o_proj_bias else 0) + (heads if self.attention_sinks else 0)
        mlp = 3 * h * self.intermediate_size
        if self.moe is not None:  # the router, and per expert its weights and biases
            e, i = self.moe.num_experts, self.intermediate_size
            mlp = e * (h + 1) + e * (3 * h * i + 2 * i + h)
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return layers * (attention + mlp + 2 * h) + embeddings + h

    @property
    def active_parameters(self) -> int:
        """Parameters one token's forward reads: not the experts its router passes over, nor
        an untied embedding table, of which a lookup reads one row (a tied one is read whole
        as the LM head). GPT-OSS-20B: 3.6B, as OpenAI counts it."""
        h, i = self.hidden_size, self.intermediate_size
        idle = 0 if self.tie_word_embeddings else self.vocab_size * h
        if self.moe is not None:
            per_expert = 3 * h * i + 2 * i + h
            idle += self.num_hidden_layers * (self.moe.num_experts - self.moe.top_k) * per_expert
        return self.num_parameters - idle

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
        gpt_oss = arch == "GptOssForCausalLM"
        layers = int(raw["num_hidden_layers"])
        return cls(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", arch in ("Qwen2ForCausalLM",
                                                                    "GptOssForCausalLM"))),
            qk_norm=arch == "Qwen3ForCausalLM",
            dtype=DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype")), torch.float32),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            o_proj_bias=gpt_oss and bool(raw.get("attention_bias", True)),
            attention_sinks=gpt_oss,
            **(_gpt_oss_fields(raw, layers) if gpt_oss else {}),
        )  # fmt: skip


def _gpt_oss_fields(raw: Mapping[str, Any], layers: int) -> dict[str, Any]:
    """GPT-OSS's sliding layers and experts, with transformers' GptOssConfig defaults."""
    window = raw.get("sliding_window", 128)
    types = raw.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
    ]
    if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(
            f"layer_types: expected {layers} entries, each sliding_attention or "
            f"full_attention, got {types!r}"
        )
    moe = MoEConfig(
        num_experts=int(raw.get("num_local_experts", 128)),
        top_k=int(raw.get("num_experts_per_tok", 4)),
        swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
    )
    if not 1 <= moe.top_k <= moe.num_experts:
        raise ValueError(
            f"num_experts_per_tok: expected 1 to num_local_experts ({moe.num_experts}), "
            f"got {moe.top_k}"
        )
    return {
        "sliding_window": None if window is None else int(window),
        "layer_types": tuple(types),
        "moe": moe,
    }


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
