"""The Llama family on our layers: Llama 2/3, Qwen2 (q/k/v bias), Qwen3 (q/k head norm), and
GPT-OSS, a Llama-shaped decoder with a mixture-of-experts MLP (layers/moe.py), biases on every
attention projection, a learned softmax sink per query head, and sliding-window attention on
every other layer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

from runtime.attention.interface import AttentionBackend, AttentionMetadata
from runtime.config import ModelConfig
from runtime.layers import mxfp4
from runtime.layers.activation import SiluAndMul
from runtime.layers.embedding import LMHead, VocabEmbedding
from runtime.layers.linear import MergedLinear, RowParallelLinear
from runtime.layers.moe import MoE
from runtime.layers.norm import RMSNorm
from runtime.layers.rotary import Rope, RotaryEmbedding
from runtime.layers.weight_loader import float_loader, float_name, set_param_loader
from runtime.parallel import SINGLE, TensorParallel

# (our fused projection, the checkpoint's separate one, its shard id)
_STACKED = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", "gate"),
    ("gate_up_proj", "up_proj", "up"),
)
# The shards a parameter needs before it is whole; an unfused parameter needs its one tensor.
_SHARDS: dict[str, set[str | None]] = {
    fused: {shard for f, _, shard in _STACKED if f == fused} for fused, _, _ in _STACKED
}


def kv_heads_per_rank(cfg: ModelConfig, tp: TensorParallel) -> int:
    """K/V heads each rank holds (and caches): its share, or one replicated head when there
    are fewer K/V heads than ranks (ModelConfig.check_tensor_parallel guarantees either
    divides the other)."""
    return max(1, cfg.num_key_value_heads // tp.size)


class Attention(nn.Module):
    """Sharded by heads: rank r runs query heads [r * H/N, (r + 1) * H/N) and the K/V heads
    they read, so attention itself needs no communication; o_proj sums the ranks' parts."""

    def __init__(
        self, cfg: ModelConfig, backend: AttentionBackend, tp: TensorParallel, layer: int
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads // tp.size, kv_heads_per_rank(cfg, tp), cfg.head_dim,
        )  # fmt: skip
        q_size = cfg.num_attention_heads * self.head_dim
        kv_size = cfg.num_key_value_heads * self.head_dim
        kv_parts = min(tp.size, cfg.num_key_value_heads)
        self.qkv_proj = MergedLinear(
            cfg.hidden_size, [q_size, kv_size, kv_size], ["q", "k", "v"], cfg.attention_bias,
            tp, [tp.size, kv_parts, kv_parts],
        )  # fmt: skip
        self.o_proj = RowParallelLinear(q_size, cfg.hidden_size, tp, cfg.o_proj_bias)
        self.sliding_window = cfg.window_of(layer)
        self.sinks: nn.Parameter | None = None
        if cfg.attention_sinks:  # one per query head: this rank's heads' share
            self.sinks = nn.Parameter(torch.empty(self.heads))
            set_param_loader(self.sinks, self._load_sinks, (cfg.num_attention_heads,))
        self.tp = tp
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.backend = backend
        self.scale = self.head_dim**-0.5

    def forward(
        self, rope: Rope, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        tokens = x.shape[0]
        q = q.view(tokens, self.heads, self.head_dim)
        k = k.view(tokens, self.kv_heads, self.head_dim)
        v = v.view(tokens, self.kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.apply(q), rope.apply(k)
        # The kernels take sinks in float32 whatever the model's dtype (a no-op in float32).
        sinks = None if self.sinks is None else self.sinks.float()
        out = self.backend.forward(q, k, v, kv_cache, meta, self.scale,
                                   sliding_window=self.sliding_window, sinks=sinks)  # fmt: skip
        return self.o_proj(out.reshape(tokens, self.heads * self.head_dim))  # type: ignore[no-any-return]

    def _load_sinks(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> None:
        start, length = self.tp.slice_of(loaded.shape[0])
        param.data.copy_(loaded.narrow(0, start, length))


class MLP(nn.Module):
    """Sharded by intermediate columns: gate_up column-parallel, down_proj row-parallel."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedLinear(
            cfg.hidden_size, [size, size], ["gate", "up"], bias=False, tp=tp
        )
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))  # type: ignore[no-any-return]


class DecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        backend: AttentionBackend,
        tp: TensorParallel,
        layer: int,
        quantization: str | None,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, backend, tp, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: MLP | MoE = (
            MLP(cfg, tp) if cfg.moe is None else MoE(cfg, tp, mxfp4=quantization == "mxfp4")
        )

    def forward(
        self,
        rope: Rope,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the add of one layer's
        output to the stream is the next norm's, fused into it (norm.py)."""
        if residual is None:  # the first layer: the stream is the embedding
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        backend: AttentionBackend,
        tp: TensorParallel,
        quantization: str | None,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings,
                                      cfg.rope_theta, cfg.rope_scaling)  # fmt: skip
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, backend, tp, i, quantization) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """At tensor-parallel size N, rank r's shard of the model (see parallel.py). Built with
    `quantization="mxfp4"`, a mixture of experts holds its experts in MXFP4 from the start
    (layers/moe.py); other methods convert the linear layers after loading
    (quantization.py)."""

    def __init__(
        self,
        cfg: ModelConfig,
        backend: AttentionBackend,
        tp: TensorParallel = SINGLE,
        quantization: str | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, backend, tp, quantization)
        self.lm_head = LMHead(self.model.embed_tokens, cfg.tie_word_embeddings)

    @property
    def supports_cuda_graphs(self) -> bool:
        """Whether a decode step runs without host synchronisation, as capture needs: the
        attention backend's say, and of a mixture of experts, whether its experts run fused
        (layers/moe_triton.py; the torch grouping reads group sizes on the host)."""
        layers = [cast(DecoderLayer, layer) for layer in self.model.layers]
        return layers[0].self_attn.backend.supports_cuda_graphs and all(
            not isinstance(layer.mlp, MoE) or layer.mlp.experts.fused is not None
            for layer in layers
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [tokens, hidden] of a flattened step (see attention/interface.py)."""
        x = self.model.embed_tokens(input_ids)
        rope = self.model.rotary(positions)  # once per step, shared by every layer
        residual = None
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(rope, x, residual, cache, meta)
        hidden, _ = self.model.norm(x, residual)
        return hidden  # type: ignore[no-any-return]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits [rows, vocab] of the hidden rows the caller picked (those sampling);
        None on tensor-parallel ranks other than 0."""
        return self.lm_head(hidden)  # type: ignore[no-any-return]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load checkpoint tensors by their Hugging Face names, through each parameter's
        `weight_loader`. Returns our parameters now whole (a fused one once all its shards
        arrived), so the caller can name what the checkpoint lacked."""
        params = dict(self.named_parameters())
        # A weight this model holds quantised: its float name -> the parameters holding it
        # (named {weight}_{part}, weight_loader.py), which a float tensor of that name fills.
        quantized: dict[str, list[str]] = {}
        for n, p in params.items():
            if not p.is_floating_point():
                quantized.setdefault(float_name(n), []).append(n)
        arrived: dict[str, set[str | None]] = {}
        packed: dict[str, dict[str, torch.Tensor]] = {}  # an MXFP4 weight's blocks or scales
        for hf_name, tensor in weights:
            if "rotary_emb.inv_freq" in hf_name:
                continue  # recomputed, not learned
            if hf_name.endswith(("_blocks", "_scales")) and hf_name not in params:
                # OpenAI's MXFP4 expert weights into a float model: dequantised once both came
                stem, part = hf_name.rsplit("_", 1)
                packed.setdefault(stem, {})[part] = tensor
                if len(packed[stem]) < 2:
                    continue
                pair = packed.pop(stem)
                hf_name = stem
                # transformers' layout, [experts, in, out]: the loaders take that
                tensor = mxfp4.dequantize(pair["blocks"], pair["scales"], torch.float32)
                tensor = tensor.transpose(1, 2)
            if hf_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints store the head anyway: it is the embedding
            name, shard = hf_name, None
            for fused, part, shard_id in _STACKED:
                if f".{part}." in hf_name:
                    name, shard = hf_name.replace(f".{part}.", f".{fused}."), shard_id
                    break
            if name in quantized:  # a float weight quantised as it loads
                for part in quantized[name]:  # one of them takes the float weight
                    if (load := float_loader(params[part])) is not None:
                        load[0](tensor)
                    arrived[part] = {None}
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no parameter in this model")
            param = params[name]
            param.weight_loader(param, tensor, shard)  # type: ignore[attr-defined]
            arrived.setdefault(name, set()).add(shard)
        return {
            name
            for name, shards in arrived.items()
            if shards >= _SHARDS.get(name.split(".")[-2], {None})
        }
