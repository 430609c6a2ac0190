from __future__ import annotations

from pathlib import Path

import numpy as np

from bench import workload
from bench.compose import compose as bench_cfg
from bench.config import BenchConfig


def _build(cfg: BenchConfig, text: bool = False) -> workload.Workload:
    return workload.build(cfg.scenario, cfg.workload, cfg.seed, text)


def test_same_seed_gives_the_same_workload_and_digest() -> None:
    cfg = bench_cfg("scenario=concurrency")
    a, b = _build(cfg), _build(cfg)
    assert a.digest == b.digest
    assert a.batches[2, 3] == b.batches[2, 3]


def test_another_seed_gives_another_digest() -> None:
    assert _build(bench_cfg("seed=0")).digest != _build(bench_cfg("seed=1")).digest


def test_token_prompts_have_exact_lengths_inside_the_id_range() -> None:
    cfg = bench_cfg("scenario=lengths", "scenario.repeats=1")
    for (level, _), specs in _build(cfg).batches.items():
        expected = cfg.scenario.levels()[level].input_tokens
        for spec in specs:
            assert isinstance(spec.prompt, list)
            assert len(spec.prompt) == expected
            assert min(spec.prompt) >= cfg.workload.token_id_low
            assert max(spec.prompt) < cfg.workload.token_id_high


def test_every_concurrency_level_gets_the_same_prompts() -> None:
    w = _build(bench_cfg("scenario=concurrency"))
    assert [s.prompt for s in w.batches[0, 1]] == [s.prompt for s in w.batches[3, 1]]
    assert [s.prompt for s in w.batches[0, 0]] != [s.prompt for s in w.batches[0, 1]]


def test_text_prompts_without_tokenizer_have_one_word_per_token() -> None:
    w = _build(bench_cfg("scenario.input_tokens=37"), text=True)
    assert all(len(str(s.prompt).split()) == 37 for s in w.batches[0, 0])


def test_poisson_offsets_hold_the_requested_rate() -> None:
    cfg = bench_cfg("scenario.request_rate=50", "scenario.num_requests=4000", "scenario.repeats=1")
    offsets = [s.offset_s for s in _build(cfg).batches[0, 0]]
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    assert abs(gaps.mean() - 1 / 50) < 0.05 / 50
    # Exponential gaps: the coefficient of variation is 1.
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.08


def test_closed_loop_has_no_send_offsets() -> None:
    assert {s.offset_s for s in _build(bench_cfg()).batches[0, 0]} == {0.0}


def test_text_prompts_have_exact_lengths_with_a_local_tokenizer(word_tokenizer: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(word_tokenizer, local_files_only=True)
    cfg = bench_cfg("scenario.input_tokens=40", "scenario.range_ratio=0.5")
    w = workload.build(cfg.scenario, cfg.workload, cfg.seed, text=True, tokenizer=tok)
    for spec in w.batches[0, 0]:
        ids = tok.encode(spec.prompt, add_special_tokens=False)
        assert len(ids) == spec.input_tokens
        assert tok.unk_token_id not in ids  # special tokens are never drawn
