"""Token embedding and the LM head that turns hidden states back into vocabulary logits.

Vocabulary-parallel sharding (each rank a slice of the vocabulary) will live here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.layers.weight_loader import set_weight_loader


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        # Left uninitialised: every parameter is filled by a loader (checkpoint or dummy).
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        set_weight_loader(self)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Tied, it holds the embedding's own Parameter: one tensor in two modules, so the model
    lists it once (as the embedding) and loading the embedding loads the head."""

    def __init__(self, embedding: VocabEmbedding, tied: bool) -> None:
        super().__init__()
        if tied:
            self.weight = embedding.weight
        else:
            self.weight = nn.Parameter(torch.empty_like(embedding.weight))
            set_weight_loader(self)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [tokens, vocab] in float32, whatever the model's dtype, for the sampler."""
        return (hidden @ self.weight.T).float()
