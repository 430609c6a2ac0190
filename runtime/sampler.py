"""Next-token choice from logits: greedy, temperature, top-k, top-p, per-request seeds.

A request with a seed draws from its own generator, so its tokens do not depend on which other
requests share its batch; requests without one share the engine's generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from runtime.sequence import SamplingParams


class Sampler:
    def __init__(self, seed: int) -> None:
        self._shared = torch.Generator().manual_seed(seed)
        self._own: dict[int, torch.Generator] = {}  # seq id -> generator of a seeded request

    def forget(self, seq_id: int) -> None:
        """Drop a finished request's generator."""
        self._own.pop(seq_id, None)

    def _generator(self, seq_id: int, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self._shared
        if seq_id not in self._own:
            self._own[seq_id] = torch.Generator().manual_seed(params.seed)
        return self._own[seq_id]

    def __call__(
        self, logits: torch.Tensor, seq_ids: Sequence[int], params: Sequence[SamplingParams]
    ) -> list[int]:
        """One token per row of `logits` ([rows, vocab])."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()  # on the logits' device: only ids cross
        # Random rows are drawn on the CPU: its generators are the requests' (a CUDA tensor
        # cannot draw from them), and a seed gives the same tokens on any device. Only these
        # rows are copied, at once.
        drawn = [row for row, p in enumerate(params) if p.temperature != 0.0]
        host = dict(zip(drawn, logits[drawn].cpu(), strict=True)) if drawn else {}
        tokens = []
        for row, (seq_id, p) in enumerate(zip(seq_ids, params, strict=True)):
            if p.temperature == 0.0:
                tokens.append(int(greedy[row]))
                continue
            probs = _filtered_probs(host[row] / p.temperature, p.top_k, p.top_p)
            pick = torch.multinomial(probs, 1, generator=self._generator(seq_id, p))
            tokens.append(int(pick.item()))
        return tokens


def _filtered_probs(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before
        # it is still below top_p (so the most likely token always stays).
        drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs / probs.sum()
