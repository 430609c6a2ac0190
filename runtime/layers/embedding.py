"""Token embedding and the LM head that turns hidden states back into vocabulary logits.

Both are vocabulary-parallel: rank r holds rows [r * per_rank, (r + 1) * per_rank) of the
[vocab, hidden] table, per_rank = ceil(vocab / ranks); the last rank's rows past the vocabulary
are padding (zeros, never looked up, cut from the logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.layers.linear import ReplaceableWeight
from runtime.layers.weight_loader import logical_shape, set_weight_loader
from runtime.parallel import SINGLE, TensorParallel


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        self.per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * self.per_rank
        # Left uninitialised: every parameter is filled by a loader (checkpoint or dummy).
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size))
        set_weight_loader(self, self.load_rows, (vocab_size, hidden_size))

    def load_rows(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None) -> None:
        """This rank's rows of the whole [vocab, hidden] table; padding rows are zeroed."""
        if loaded.shape != (self.vocab_size, param.shape[1]):
            raise ValueError(
                f"checkpoint tensor {tuple(loaded.shape)} != embedding "
                f"({self.vocab_size}, {param.shape[1]})"
            )
        rows = max(0, min(self.per_rank, self.vocab_size - self.start))
        param.data[:rows].copy_(loaded.narrow(0, self.start, rows))
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        # Each rank embeds the ids in its rows and zeros the rest; the sum is the embedding.
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(outside[:, None], 0.0))


class LMHead(ReplaceableWeight):
    """Tied, it holds the embedding's own Parameter: one tensor in two modules, so the model
    lists it once (as the embedding) and loading the embedding loads the head. Untied, its
    weight may be replaced once loaded, as a linear layer's (linear.py)."""

    def __init__(self, embedding: VocabEmbedding, tied: bool) -> None:
        super().__init__()
        self.vocab_size, self.tp = embedding.vocab_size, embedding.tp
        self.matmul, self.shares_weight = None, tied
        if tied:
            self.weight = embedding.weight
        else:
            self.weight = nn.Parameter(torch.empty_like(embedding.weight))
            set_weight_loader(self, embedding.load_rows, logical_shape(embedding.weight))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [tokens, vocab] in float32, whatever the model's dtype, for the sampler; on
        ranks other than 0 (which only contribute their vocabulary slice), None."""
        logits = self.tp.gather_last_dim(self.project(hidden).float())
        return None if logits is None else logits[:, : self.vocab_size]
