"""Deterministic request workloads: prompts of exact token lengths and arrival schedules.

Everything here is a pure function of the seed, the scenario and the files it names (a
dataset, a trace), so two runs (an A/B pair, or the same command next week) send byte-identical
work; `Workload.digest` proves it. Prompts depend on (seed, repeat, input and output length)
but not on the load level, so every concurrency of a sweep is served the same prompts; shared
prefixes are the exception (below).

Four kinds of prompt: random tokens (lengths from scenario.length_distribution); a dataset's
texts (bench/datasets.py); random tokens behind a group's shared prefix (scenario.prefix_groups);
a trace's hash blocks at the trace's send times (bench/traces.py). Conversations
(scenario.turns > 1) group random or dataset prompts into turns: the workload holds each turn's
new user message, and bench/load.py adds the history, whose replies only the server decides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from bench import datasets, traces
from bench.config import ConfigError, LoadLevel, ScenarioConfig, WorkloadConfig

# Common English words that are one token (with their leading space) in the GPT-2, Llama and
# Qwen vocabularies: the fallback for text prompts when no tokenizer is configured.
_WORDS = (
    "the of and to in is was for on that with as by at from his it an were are which this be "
    "or has had not first one their its new after but who they have her she two been other "
    "when there all during into school time may years more most only over city some world "
    "would where later up such used many can state about national out known university "
    "united then made team these him year part music film three new game also well while "
    "back"
).split()
_WARMUP_REPEAT = -1
Floats = npt.NDArray[np.float64]


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the harness uses."""

    vocab_size: int
    all_special_ids: list[int]

    def __hash__(self) -> int: ...  # a dataset's rows are counted and cached per tokenizer
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


def load_tokenizer(path: str | None) -> Tokenizer | None:
    """A local Hugging Face tokenizer (never downloaded), or None without a path."""
    if path is None:
        return None
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is configured

    tok: Tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)  # type: ignore[assignment]
    return tok


@dataclass(frozen=True)
class Exchange:
    """An earlier turn of a conversation: the user's message and the server's actual reply."""

    user: list[int] | str
    assistant: str


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: list[int] | str  # a conversation's turn: the new user message alone
    input_tokens: int  # intended length (of the new message); the server's usage counts all
    output_tokens: int
    offset_s: float  # open loop: send time after the level's start; closed loop: 0
    # Requests that belong together (a shared prefix's group, a conversation's turns) and the
    # request's place in it; None where a workload has no groups.
    group_id: int | None = None
    group_position: int | None = None
    # Set as the request is sent (bench/load.py), never by the workload: the conversation's
    # turns before this one, and whether it goes during scenario.ramp_up_s.
    history: tuple[Exchange, ...] = ()
    ramp_up: bool = False


@dataclass(frozen=True)
class Workload:
    warmup: list[RequestSpec]
    batches: dict[tuple[int, int], list[RequestSpec]]  # (level index, repeat) -> requests
    digest: str  # sha256 over every prompt, length and send offset, in order (see _digest)


def within_vocabulary(cfg: WorkloadConfig, vocab_size: int) -> WorkloadConfig:
    """`cfg` with random prompt token ids drawn below `vocab_size`: the configured range is
    wide enough for every common vocabulary, and a server rejects ids past its own."""
    if cfg.token_id_high <= vocab_size:
        return cfg
    if cfg.token_id_low >= vocab_size:
        raise ConfigError(
            f"workload.token_id_low: expected an id below the model's vocabulary size "
            f"{vocab_size}, got {cfg.token_id_low}; set e.g. workload.token_id_low=3"
        )
    return dataclasses.replace(cfg, token_id_high=vocab_size)


def _token_prompt(rng: np.random.Generator, n: int, cfg: WorkloadConfig) -> list[int]:
    return [int(t) for t in rng.integers(cfg.token_id_low, cfg.token_id_high, size=n)]


def _text_prompt(
    rng: np.random.Generator, n: int, cfg: WorkloadConfig, tokenizer: Tokenizer | None
) -> str:
    if tokenizer is None:
        return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=n))
    # Random ids of the tokenizer's own vocabulary (special tokens excluded); decoding and
    # encoding again rarely round-trips to the same length (merges across the seams), so trim
    # or pad with fresh ids until it does, as vLLM's random dataset does.
    usable = np.setdiff1d(np.arange(tokenizer.vocab_size), tokenizer.all_special_ids)

    def draw(k: int) -> list[int]:
        return [int(t) for t in rng.choice(usable, size=k)]

    ids = draw(n)
    for _ in range(16):
        text = tokenizer.decode(ids)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == n:
            return text
        ids = ids[:n] if len(ids) > n else ids + draw(n - len(ids))
    return tokenizer.decode(ids[:n])


def _lengths(rng: np.random.Generator, n: int, mean: int, scenario: ScenarioConfig) -> list[int]:
    """`n` lengths around `mean` drawn from the scenario's distribution, each at least 1."""
    ratio, distribution = scenario.range_ratio, scenario.length_distribution
    if distribution == "fixed" or (distribution == "uniform" and ratio == 0.0):
        return [mean] * n
    if distribution == "uniform":
        low, high = max(1, round(mean * (1 - ratio))), round(mean * (1 + ratio))
        return [int(x) for x in rng.integers(low, high + 1, size=n)]
    if distribution == "normal":
        drawn = rng.normal(mean, scenario.length_sd * mean, size=n)
    elif distribution == "lognormal":
        # mu such that the mean (not the median) is `mean`: E[X] = exp(mu + sigma^2 / 2).
        sigma = scenario.length_sigma
        drawn = rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, size=n)
    else:
        raise ConfigError(f"scenario.length_distribution={distribution}: not a synthetic one")
    return [max(1, round(float(x))) for x in drawn]


def _offsets(
    rng: np.random.Generator, n: int, rate: float | None, burstiness: float, ramp_up_s: float
) -> list[float]:
    if rate is None:
        return [0.0] * n
    # Gamma gaps with mean 1/rate; shape 1 is exponential, i.e. Poisson arrivals.
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0
    steady = np.cumsum(gaps)
    if ramp_up_s:
        steady = _ramped(steady, rate, ramp_up_s)
    return [float(x) for x in steady]


def _ramped(steady: Floats, rate: float, ramp_up_s: float) -> Floats:
    """Arrival times at the full rate, moved onto an intensity that rises linearly from 0 to
    `rate` over `ramp_up_s`, then stays: time-rescaling turns the process of constant rate into
    one of the ramped intensity. The cumulative intensity is L(t) = rate t^2 / (2 R) during the
    ramp and rate R / 2 + rate (t - R) after it; arrival i goes where L(t) = rate * steady_i."""
    expected = rate * steady  # arrivals expected by each time at the full rate
    during = expected < rate * ramp_up_s / 2
    inside = np.sqrt(2.0 * ramp_up_s * expected / rate)
    after = ramp_up_s + (expected - rate * ramp_up_s / 2) / rate
    return np.where(during, inside, after)


def level_batch(
    scenario: ScenarioConfig,
    cfg: WorkloadConfig,
    seed: int,
    text: bool,
    tokenizer: Tokenizer | None,
    level: LoadLevel,
    repeat: int,
    n: int,
) -> list[RequestSpec]:
    """The `n` requests of one repeat of a level: prompts from (seed, repeat, lengths), so every
    load of a sweep gets the same ones; open-loop send offsets from (seed, repeat, level), or
    the trace's own."""
    if scenario.trace_path is not None:
        return _trace_specs(scenario, cfg, seed, text, n)
    arrival_rng = np.random.default_rng([seed, repeat + 1, level.index, 7])
    rate, ramp = level.request_rate, scenario.ramp_up_s
    offsets = _offsets(arrival_rng, n, rate, scenario.burstiness, ramp)
    specs = _specs(scenario, cfg, seed, text, tokenizer, repeat, level, offsets)
    if scenario.turns == 1:
        return specs
    # Conversation c is requests c*T .. c*T+T-1, its turns in order (bench/load.py sends them).
    turns = scenario.turns
    return [
        dataclasses.replace(s, group_id=i // turns, group_position=i % turns)
        for i, s in enumerate(specs)
    ]


def _specs(
    scenario: ScenarioConfig,
    cfg: WorkloadConfig,
    seed: int,
    text: bool,
    tokenizer: Tokenizer | None,
    repeat: int,
    level: LoadLevel,
    offsets: list[float],
) -> list[RequestSpec]:
    if scenario.dataset is not None:
        return _dataset_specs(scenario, seed, tokenizer, repeat, level, offsets)
    if scenario.prefix_groups:
        return _shared_prefix_specs(scenario, cfg, seed, text, tokenizer, repeat, level, offsets)
    n, inp, out = len(offsets), level.input_tokens, level.output_tokens
    rng = np.random.default_rng([seed, repeat + 1, inp, out])
    ins = _lengths(rng, n, inp, scenario)
    outs = _lengths(rng, n, out, scenario)
    return [
        RequestSpec(
            i,
            _text_prompt(rng, ins[i], cfg, tokenizer) if text else _token_prompt(rng, ins[i], cfg),
            ins[i],
            outs[i],
            offsets[i],
        )
        for i in range(n)
    ]


def _dataset_specs(
    scenario: ScenarioConfig,
    seed: int,
    tokenizer: Tokenizer | None,
    repeat: int,
    level: LoadLevel,
    offsets: list[float],
) -> list[RequestSpec]:
    """A dataset's prompts, sent as text on either endpoint; each repeat samples its own rows.
    Output lengths are the rows' own (length_distribution=dataset; a row without one gets the
    level's, which bench.config sets to the mean of the rows that tell one), else drawn around
    the level's."""
    assert scenario.dataset is not None
    rows = datasets.load(scenario.dataset, tokenizer).rows
    n = len(offsets)
    rng = np.random.default_rng([seed, repeat + 1, 31])
    picks = [rows[i] for i in datasets.sample(rng, len(rows), n)]
    if scenario.length_distribution == "dataset":
        outs = [row.output_tokens or level.output_tokens for row in picks]
    else:
        outs = _lengths(rng, n, level.output_tokens, scenario)
    return [
        RequestSpec(i, row.prompt, row.input_tokens, outs[i], offsets[i])
        for i, row in enumerate(picks)
    ]


def _shared_prefix_specs(
    scenario: ScenarioConfig,
    cfg: WorkloadConfig,
    seed: int,
    text: bool,
    tokenizer: Tokenizer | None,
    repeat: int,
    level: LoadLevel,
    offsets: list[float],
) -> list[RequestSpec]:
    """Request i belongs to group i % G at position i // G: every group's first request is sent
    before any other of its group, so at most G users in flight the prefix is in the server's
    cache before the group's later requests arrive. Prefixes come from (seed, repeat, level),
    unlike other prompts, so no level or repeat finds the groups of an earlier one cached and
    position 0 always measures a cold prefix."""
    n, groups, prefix = len(offsets), scenario.prefix_groups, scenario.prefix_tokens
    rng = np.random.default_rng([seed, repeat + 1, level.index, 23])
    ins = [max(k, prefix + 1) for k in _lengths(rng, n, level.input_tokens, scenario)]
    outs = _lengths(rng, n, level.output_tokens, scenario)

    def draw(k: int) -> list[int] | str:
        return _text_prompt(rng, k, cfg, tokenizer) if text else _token_prompt(rng, k, cfg)

    heads = [draw(prefix) for _ in range(groups)]
    specs = []
    for i in range(n):
        head, tail = heads[i % groups], draw(ins[i] - prefix)
        # Text joins with a space (exact token sharing needs token ids; see docs/metrics.md).
        prompt = f"{head} {tail}" if isinstance(head, str) else [*head, *tail]
        specs.append(RequestSpec(i, prompt, ins[i], outs[i], offsets[i], i % groups, i // groups))
    return specs


def _trace_specs(
    scenario: ScenarioConfig, cfg: WorkloadConfig, seed: int, text: bool, n: int
) -> list[RequestSpec]:
    """The trace's first `n` requests at their own times: every repeat replays the same."""
    assert scenario.trace_path is not None
    if text:
        raise ConfigError(
            "scenario.trace_path: a trace replays token ids (its blocks are token blocks); use "
            "target.endpoint=completions with workload.prompt_format=auto or token_ids"
        )
    trace = traces.load(scenario.trace_path)
    blocks = traces.Blocks(seed, cfg.token_id_low, cfg.token_id_high)
    offsets = traces.offsets(trace, n, scenario.time_scale)
    return [
        RequestSpec(i, blocks.prompt(r), r.input_length, r.output_length, offsets[i])
        for i, r in enumerate(trace.requests[:n])
    ]


def build(
    scenario: ScenarioConfig,
    cfg: WorkloadConfig,
    seed: int,
    text: bool,
    tokenizer: Tokenizer | None = None,
) -> Workload:
    """Every request of a scenario's levels (a capacity search's first probe), warm-up first,
    in the order they will be sent."""
    first = scenario.levels()[0]
    warm_offsets = [0.0] * scenario.warmup_requests
    warmup = _specs(scenario, cfg, seed, text, tokenizer, _WARMUP_REPEAT, first, warm_offsets)
    batches = {
        (level.index, repeat): level_batch(
            scenario, cfg, seed, text, tokenizer, level, repeat, scenario.num_requests
        )
        for level in scenario.levels()
        for repeat in range(scenario.repeats)
    }
    files = [
        source
        for source in (
            scenario.dataset and datasets.load(scenario.dataset, tokenizer).sha256,
            scenario.trace_path and traces.load(scenario.trace_path).sha256,
        )
        if source
    ]
    shape = (scenario.turns, scenario.think_time_s, scenario.ramp_up_s)
    return Workload(warmup, batches, _digest(scenario.levels(), warmup, batches, files, shape))


def _digest(
    levels: list[LoadLevel],
    warmup: list[RequestSpec],
    batches: dict[tuple[int, int], list[RequestSpec]],
    files: list[str],
    shape: tuple[int, float, float],
) -> str:
    """sha256 over every request (and the content of the files they came from, where any), in
    order, and over the conversations' and ramp's shape (turns, think time, ramp-up) where they
    are set; a scenario without files, conversations or ramp hashes exactly as before those
    existed. A conversation's replies come from the server: the digest covers its user turns."""
    h = hashlib.sha256()
    for sha in files:
        h.update(json.dumps(["file", sha]).encode())
    if shape != (1, 0.0, 0.0):
        h.update(json.dumps(["shape", *shape]).encode())

    def feed(tag: object, reqs: list[RequestSpec]) -> None:
        h.update(json.dumps(tag).encode())
        for r in reqs:
            row = [r.prompt, r.input_tokens, r.output_tokens, round(r.offset_s, 6)]
            h.update(json.dumps(row, separators=(",", ":")).encode())

    feed("warmup", warmup)
    for level in levels:
        for (index, repeat), reqs in batches.items():
            if index == level.index:
                feed([level.concurrency, level.request_rate, repeat], reqs)
    return h.hexdigest()
