"""Drive a model step by step over a paged KV cache, as the model runner does, minus scheduling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.attention.interface import AttentionBackend, AttentionMetadata
from runtime.attention.reference import TorchAttention
from runtime.config import ModelConfig
from runtime.loader import load_dummy
from runtime.models.llama import LlamaForCausalLM


@dataclass(frozen=True)
class Chunk:
    """One sequence's part of a step: `tokens` at positions start.., cached through `blocks`."""

    tokens: list[int]
    start: int  # tokens of this sequence already in the cache
    blocks: list[int]  # its block table


def small_llama(backend: AttentionBackend, max_positions: int = 256) -> LlamaForCausalLM:
    """A 2-layer Llama (GQA 4/2, vocabulary 320) with dummy weights over `backend`."""
    cfg = ModelConfig.from_hf({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 64,
        "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": max_positions,
    })  # fmt: skip
    model = LlamaForCausalLM(cfg, backend).eval()
    load_dummy(model, seed=0)
    with torch.no_grad():
        # Dummy weights (std 0.02) attend almost uniformly, which hides a key seen too many or
        # too few; five times larger, each key shifts the logits well beyond 1e-5.
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.mul_(5)
    return model


def new_caches(model: LlamaForCausalLM, num_blocks: int, block_size: int) -> list[torch.Tensor]:
    cfg = model.config
    shape = TorchAttention().kv_cache_shape(
        num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim
    )
    device = model.model.embed_tokens.weight.device  # the LM head's may be packed away
    return [torch.zeros(shape, device=device) for _ in range(cfg.num_hidden_layers)]


def step_inputs(
    chunks: list[Chunk], block_size: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(input ids, positions, metadata) of one step over `chunks`, as the model runner makes."""

    def tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, device=device)

    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    for c in chunks:
        span = range(c.start, c.start + len(c.tokens))
        ids += c.tokens
        positions += span
        slots += [c.blocks[p // block_size] * block_size + p % block_size for p in span]
        starts.append(starts[-1] + len(c.tokens))
    width = max(len(c.blocks) for c in chunks)
    meta = AttentionMetadata(
        slot_mapping=tensor(slots),
        query_start_loc=tensor(starts),
        context_lens=tensor([c.start + len(c.tokens) for c in chunks]),
        block_tables=tensor([c.blocks + [-1] * (width - len(c.blocks)) for c in chunks]),
    )
    return tensor(ids), tensor(positions), meta


def run_step(
    model: LlamaForCausalLM, caches: list[torch.Tensor], chunks: list[Chunk]
) -> list[torch.Tensor]:
    """Logits [len(tokens), vocab] of every chunk, after one forward of them all together."""
    block_size = caches[0].shape[3]  # head-major: [2, blocks, kv_heads, block_size, head_dim]
    ids, positions, meta = step_inputs(chunks, block_size, caches[0].device)
    with torch.inference_mode():
        hidden = model(ids, positions, caches, meta)
        return list(torch.split(model.compute_logits(hidden), [len(c.tokens) for c in chunks]))


def prefill(model: LlamaForCausalLM, tokens: list[int], block_size: int = 4) -> torch.Tensor:
    """Logits for every position of one sequence, prefilled at once into a fresh cache."""
    blocks = -(-len(tokens) // block_size)
    caches = new_caches(model, blocks, block_size)
    return run_step(model, caches, [Chunk(tokens, 0, list(range(blocks)))])[0]
