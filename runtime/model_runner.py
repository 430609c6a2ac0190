"""Turns a scheduled step into tensors, runs the model over the paged KV cache, returns logits.

Each scheduled sequence contributes its next `num_new_tokens` tokens (a prefill chunk or one
decode token) at positions num_computed .. num_computed + n - 1; their K/V go to the cache slots
its block table assigns to those positions. Logits are computed only for the last token of the
sequences that sample this step.
"""

from __future__ import annotations

import torch

from runtime.layers.attention import AttentionBackend, AttentionMetadata
from runtime.models.llama import LlamaForCausalLM
from runtime.scheduler import Step


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.model, self.block_size, self.device = model, block_size, device
        shape = backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def kv_cache_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.kv_caches)

    def _inputs(self, step: Step) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        context_lens: list[int] = []
        for item in step.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]
            starts.append(starts[-1] + item.num_new_tokens)
            context_lens.append(end)
        width = max(len(item.seq.block_table) for item in step.scheduled)
        tables = [item.seq.block_table + [-1] * (width - len(item.seq.block_table))
                  for item in step.scheduled]  # fmt: skip

        def tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        meta = AttentionMetadata(
            slot_mapping=tensor(slots),
            query_start_loc=tensor(starts),
            context_lens=tensor(context_lens),
            block_tables=tensor(tables),
        )
        return tensor(ids), tensor(positions), meta

    @torch.inference_mode()
    def run(self, step: Step) -> torch.Tensor:
        """Logits [number of sampling sequences, vocab], in the step's order."""
        ids, positions, meta = self._inputs(step)
        hidden = self.model(ids, positions, self.kv_caches, meta)
        ends = meta.query_start_loc[1:] - 1
        rows = ends[[i for i, item in enumerate(step.scheduled) if item.samples]]
        return self.model.compute_logits(hidden[rows])
