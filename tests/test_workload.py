from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from bench import workload
from bench.compose import compose as bench_cfg
from bench.config import BenchConfig, ConfigError


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


@pytest.mark.parametrize(
    ("overrides", "digest"),
    [
        ((), "96accb81fc0d0e85807bc42d0663f89addb9d4ccda2a15f94525a947b692243b"),
        (("scenario.range_ratio=0.5",),
         "2b21f6d6c0942b5e844ded49f9cefe2ed7a4b61bcc4e2504954a059ebb518998"),
        (("scenario.request_rate=4",),
         "2dc94178364c51d41b6302d5a32d1e1297e067a2c4328c728c59191c7bfb46f9"),
    ],
)  # fmt: skip
def test_the_digest_of_a_stored_runs_workload_does_not_change(
    overrides: tuple[str, ...], digest: str
) -> None:
    # Runs stored before datasets, traces and length distributions existed hashed these: the
    # same command must still send (and hash) the same work.
    assert _build(bench_cfg(*overrides)).digest == digest


def _input_lengths(*overrides: str) -> npt.NDArray[np.float64]:
    cfg = bench_cfg("scenario.input_tokens=200", "scenario.num_requests=4000", *overrides)
    return np.array([s.input_tokens for s in _build(cfg).batches[0, 0]], dtype=np.float64)


def test_fixed_lengths_are_exact() -> None:
    assert set(_input_lengths("scenario.length_distribution=fixed")) == {200}


def test_normal_lengths_have_the_mean_and_relative_sd() -> None:
    lengths = _input_lengths("scenario.length_distribution=normal", "scenario.length_sd=0.2")
    assert abs(lengths.mean() - 200) < 3 and abs(lengths.std() - 40) < 3


def test_lognormal_lengths_have_the_mean_not_the_median() -> None:
    lengths = _input_lengths("scenario.length_distribution=lognormal", "scenario.length_sigma=0.8")
    assert abs(lengths.mean() - 200) < 10
    assert np.median(lengths) < 0.8 * 200  # right-skewed, as chat lengths are
    assert lengths.min() >= 1


def test_range_ratio_belongs_to_the_uniform_distribution() -> None:
    with pytest.raises(ConfigError, match=r"scenario\.range_ratio: spreads lengths of .*uniform"):
        bench_cfg("scenario.length_distribution=normal", "scenario.range_ratio=0.5")
