"""A request inside the engine: its tokens, how many are in the KV cache, and its blocks."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI/vLLM sampling knobs; temperature 0 (or below 1e-5) is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None  # per-request reproducibility, independent of batch composition
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, matched on the detokenised text by the engine

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature < GREEDY_BELOW_TEMPERATURE:
            # Greedy, as vLLM's: logits divided by a subnormal overflow to inf, whose softmax
            # is NaN, which no sampler can draw from.
            object.__setattr__(self, "temperature", 0.0)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass(frozen=True)
class TokenOutput:
    """What one engine step did for one scheduled request. A prefill chunk that does not
    sample yet is reported without tokens, so a server can time prefill exactly."""

    seq_id: int
    new_token_ids: list[int]  # tokens sampled for this request by this step (0 or 1 today)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1
    num_preemptions: int  # cumulative
    num_kv_blocks: int
    block_size: int  # tokens per KV block


class Status(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


_ids = itertools.count()


@dataclass
class Sequence:
    """Token bookkeeping for one request.

    Invariant: 0 <= num_computed_tokens <= num_tokens; the first num_computed_tokens tokens have
    their K/V in the blocks of `block_table`, in order, block_size per block. A preempted
    sequence loses its blocks and starts again from num_computed_tokens = 0 (recompute).
    """

    token_ids: list[int]
    params: SamplingParams
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache on admission
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
