from __future__ import annotations

import torch

from runtime.sampler import Sampler
from runtime.sequence import SamplingParams

LOGITS = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, 0.0, 5.0, 0.0]])


def test_temperature_zero_is_argmax() -> None:
    greedy = SamplingParams(temperature=0.0)
    assert Sampler(0)(LOGITS, [1, 2], [greedy, greedy]) == [1, 2]


def test_top_k_one_always_takes_the_best_token() -> None:
    p = SamplingParams(temperature=1.0, top_k=1)
    sampler = Sampler(0)
    assert {sampler(LOGITS[:1], [1], [p])[0] for _ in range(50)} == {1}


def test_top_p_keeps_only_the_nucleus() -> None:
    # Probabilities of row 0 are about [0.09, 0.64, 0.24, 0.05]: top_p 0.7 keeps tokens 1 and 2.
    p = SamplingParams(temperature=1.0, top_p=0.7)
    sampler = Sampler(0)
    seen = {sampler(LOGITS[:1], [1], [p])[0] for _ in range(300)}
    assert seen == {1, 2}


def test_a_seeded_request_draws_the_same_tokens_whatever_its_batch() -> None:
    p = SamplingParams(temperature=1.0, seed=1234)
    noisy = SamplingParams(temperature=1.0)
    flat = torch.zeros(1, 1000)
    alone = Sampler(0)(flat.repeat(3, 1), [7, 7, 7], [p, p, p])
    sampler = Sampler(99)
    steps = [sampler(flat.repeat(3, 1), [5, 7, 6], [noisy, p, noisy])[1] for _ in range(3)]
    assert steps == alone  # the same three draws, one per step among others, as alone


def test_unseeded_sampling_follows_the_engine_seed() -> None:
    p = SamplingParams(temperature=1.0)
    flat = torch.zeros(4, 1000)
    assert Sampler(3)(flat, [1, 2, 3, 4], [p] * 4) == Sampler(3)(flat, [1, 2, 3, 4], [p] * 4)
    assert Sampler(3)(flat, [1, 2, 3, 4], [p] * 4) != Sampler(4)(flat, [1, 2, 3, 4], [p] * 4)


def test_a_vanishing_temperature_takes_the_best_token_instead_of_nan() -> None:
    # Dividing logits by 5e-324 would overflow them to inf and the softmax to NaN.
    p = SamplingParams(temperature=5e-324)
    assert p.temperature == 0.0
    sampler = Sampler(0)
    assert {sampler(LOGITS, [1, 2], [p, p])[0] for _ in range(20)} == {1}
    assert sampler(LOGITS, [1, 2], [p, p])[1] == 2
