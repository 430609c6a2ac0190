"""The flash-attn backend (the optional `gpu` extra): its paged kernels over its own layout.

flash-attn reads a paged cache laid out [blocks, block_size, kv_heads, head_dim] per K and V,
so this backend's cache is [2, blocks, block_size, kv_heads, head_dim]; flash-attn 2 pages
only in blocks of a multiple of 256 tokens (selection.py checks). A step in which every
sequence decodes is one `flash_attn_with_kvcache` call (split-KV decode, no host
synchronisation: CUDA graphs capture it); any other step is one `flash_attn_varlen_func`
call over the block tables, prefill chunks and decoders together, causal aligned to each
context's end (a chunk's first query sees the cached prefix). New keys and values go in with
the Triton store kernel, which skips CUDA-graph padding rows (slot -1). A sliding window of W
keys is flash-attn's window_size=(W - 1, 0); flash-attn 2 has no attention sinks, so a model
with them never gets this backend (selection.py) and `forward` refuses them.

Not yet run on a GPU: flash-attn needs CUDA, so only the rules that choose this backend
(selection.py) are tested, on CPU; the calls here are untested.
"""

from __future__ import annotations

import torch
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from runtime.attention.interface import AttentionMetadata, check_features
from runtime.attention.triton_paged import store_kv


class FlashAttention:
    name = "flash-attn"
    supports_cuda_graphs = True

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_features(q.shape[1], sliding_window, sinks)
        if sinks is not None:
            raise ValueError(
                "flash-attn 2 has no attention sinks (GPT-OSS); select_backend(..., sinks=True) "
                "picks another backend, or set RUNTIME_ATTENTION_BACKEND=triton"
            )
        # Keys from W - 1 before a query's position to it; (-1, -1) is flash-attn's "no window".
        window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
        store_kv(k, v, kv_cache, meta.slot_mapping, heads_first=False)
        # flash-attn takes int32 indices; -1 padding entries are never meant to be read, but
        # 0 keeps any that are in bounds.
        tables = meta.block_tables.clamp(min=0).to(torch.int32)
        lens = meta.context_lens.to(torch.int32)
        if meta.decode_only:
            out = flash_attn_with_kvcache(
                q.unsqueeze(1), kv_cache[0], kv_cache[1], cache_seqlens=lens,
                block_table=tables, softmax_scale=scale, causal=True, window_size=window,
            )  # fmt: skip
            return out.squeeze(1)  # type: ignore[no-any-return]
        starts = meta.query_start_loc
        ends = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
        return flash_attn_varlen_func(  # type: ignore[no-any-return]
            q, kv_cache[0], kv_cache[1], cu_seqlens_q=starts.to(torch.int32), cu_seqlens_k=ends,
            max_seqlen_q=int((starts[1:] - starts[:-1]).max()),
            max_seqlen_k=int(meta.context_lens.max()), softmax_scale=scale, causal=True,
            window_size=window, block_table=tables,
        )  # fmt: skip
