"""Tensor parallelism's end-to-end check, shared by the models that have one."""

from __future__ import annotations

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.sequence import SamplingParams


def assert_two_ranks_give_the_tokens_of_one(
    cfg: EngineConfig, prompts: list[list[int]], params: SamplingParams
) -> None:
    """Greedy tokens of `cfg` at tensor_parallel_size 2 (two gloo ranks) equal one rank's."""
    one = Engine(cfg).generate(prompts, params)
    two = Engine(EngineConfig(**{**vars(cfg), "tensor_parallel_size": 2}))
    try:
        assert two.generate(prompts, params) == one
    finally:
        two.close()
