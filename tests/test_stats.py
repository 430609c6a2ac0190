from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from bench.stats import (
    MIN_MW_SAMPLES,
    MIN_QUANTILE_SAMPLES,
    RatioTest,
    _row_quantiles,
    bootstrap_quantile_ratio,
    geomean,
    holm,
    mann_whitney_min_p,
    min_samples_for_quantile,
    ratio_test,
    session_ratio_test,
    session_sd_family,
    verdict,
)

RUN_CV = 0.03  # realistic run-to-run variation of a per-run metric


def _run_medians(rng: np.random.Generator, scale: float, runs: int = 5) -> list[float]:
    """Per-run p50 latency: lognormal requests around 100 ms, times a per-run effect."""
    return [
        float(np.median(scale * rng.normal(1.0, RUN_CV) * rng.lognormal(np.log(100), 0.4, 200)))
        for _ in range(runs)
    ]


def _latency_runs(
    rng: np.random.Generator, scale: float, run_sd: float, runs: int = 5, n: int = 100
) -> list[list[float]]:
    """Requests of each run: lognormal, with a lognormal run effect of log-sd run_sd."""
    return [
        list(scale * np.exp(np.log(100) + rng.normal(0, run_sd) + rng.normal(0, 0.4, n)))
        for _ in range(runs)
    ]


# ratio_test


def test_ratio_is_the_ratio_of_geometric_means() -> None:
    b, c = [10.0, 20.0, 40.0], [15.0, 30.0, 60.0, 45.0]
    assert ratio_test(b, c).ratio == pytest.approx(geomean(c) / geomean(b))


def test_welch_interval_and_p_match_hand_computation() -> None:
    # Logs: baseline [0, 1, 2] (mean 1, var 1), candidate [1, 3, 5] (mean 3, var 4).
    # se^2 = 1/3 + 4/3 = 5/3; Welch-Satterthwaite df = (5/3)^2 / ((1/3)^2/2 + (4/3)^2/2) = 50/17.
    lb, lc = np.array([0.0, 1.0, 2.0]), np.array([1.0, 3.0, 5.0])
    r = ratio_test(np.exp(lb), np.exp(lc))
    half = sps.t.ppf(0.975, 50 / 17) * math.sqrt(5 / 3)
    assert r.ratio == pytest.approx(math.exp(2.0))
    assert (r.ci_low, r.ci_high) == (
        pytest.approx(math.exp(2.0 - half)),
        pytest.approx(math.exp(2.0 + half)),
    )
    ref = sps.ttest_ind(lc, lb, equal_var=False)
    assert ref.df == pytest.approx(50 / 17)
    assert r.p_welch == pytest.approx(ref.pvalue)
    assert 2 * sps.t.sf(2.0 / math.sqrt(5 / 3), 50 / 17) == pytest.approx(r.p_welch)


def test_interval_confidence_level_is_respected() -> None:
    b, c = [100.0, 103.0, 98.0, 101.0, 99.0], [104.0, 107.0, 101.0, 106.0, 103.0]
    wide, narrow = ratio_test(b, c, confidence=0.99), ratio_test(b, c, confidence=0.8)
    assert wide.ci_low < narrow.ci_low < narrow.ratio < narrow.ci_high < wide.ci_high


@settings(derandomize=True, max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.9, 1.1))
def test_interval_excludes_one_exactly_when_welch_p_is_below_alpha(seed: int, shift: float) -> None:
    rng = np.random.default_rng(seed)
    r = ratio_test(rng.lognormal(0, 0.05, 5), shift * rng.lognormal(0, 0.05, 6))
    assert (r.p_welch < 0.05) == (not r.ci_low <= 1.0 <= r.ci_high)


def test_nan_values_are_dropped_and_not_counted() -> None:
    r = ratio_test([1.0, math.nan, 2.0, 4.0], [math.nan, 2.0, 4.0, 8.0])
    assert (r.n_baseline, r.n_candidate) == (3, 3)
    assert r.ratio == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [0.0, -3.0, math.inf])
def test_values_that_are_not_positive_and_finite_raise(bad: float) -> None:
    with pytest.raises(ValueError, match=r"candidate: ratios need finite values > 0"):
        ratio_test([100.0, 101.0], [100.0, bad])


def test_zero_throughput_error_says_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"every request failed.*success rate"):
        ratio_test([0.0, 12.0, 11.0], [12.0, 12.5, 11.8])


def test_a_side_with_no_values_raises() -> None:
    with pytest.raises(ValueError, match="baseline: no values"):
        ratio_test([math.nan, math.nan], [1.0, 2.0])


def test_a_single_value_gives_a_ratio_but_no_test() -> None:
    r = ratio_test([100.0], [110.0, 111.0, 109.0])
    assert r.ratio == pytest.approx(geomean([110.0, 111.0, 109.0]) / 100.0)
    assert math.isnan(r.p_welch) and math.isnan(r.ci_low) and math.isnan(r.ci_high)
    assert verdict(r, r.p_welch, higher_is_better=False) == "~"


def test_identical_constant_samples_give_p_one() -> None:
    r = ratio_test([7.0] * 5, [7.0] * 5)
    assert (r.ratio, r.ci_low, r.ci_high, r.p_welch, r.p_mannwhitney) == (1.0, 1.0, 1.0, 1.0, 1.0)


def test_different_constant_samples_give_p_zero_and_a_point_interval() -> None:
    r = ratio_test([100.0] * 5, [120.0] * 5)
    assert r.p_welch == 0.0
    assert r.ratio == r.ci_low == r.ci_high == pytest.approx(1.2)
    assert verdict(r, r.p_welch, higher_is_better=False) == "worse"


def test_constant_samples_within_the_threshold_are_not_reported() -> None:
    r = ratio_test([100.0] * 5, [101.0] * 5)
    assert r.p_welch == 0.0 and verdict(r, r.p_welch, higher_is_better=False) == "~"


# Mann-Whitney


def test_mann_whitney_is_none_below_the_minimum_and_present_at_it() -> None:
    few, enough = [1.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0]
    assert ratio_test(few, [5.0] * 10).p_mannwhitney is None
    assert ratio_test([5.0] * 10, few).p_mannwhitney is None
    separated = ratio_test(enough, [5.0, 6.0, 7.0, 8.0])
    assert separated.p_mannwhitney == pytest.approx(2 / math.comb(8, 4))  # exact test


def test_min_mw_samples_is_the_smallest_equal_size_that_can_reach_p_005() -> None:
    assert mann_whitney_min_p(MIN_MW_SAMPLES, MIN_MW_SAMPLES) < 0.05
    assert mann_whitney_min_p(MIN_MW_SAMPLES - 1, MIN_MW_SAMPLES - 1) >= 0.05
    # scipy's exact test on completely separated samples reaches exactly that bound.
    for n in (MIN_MW_SAMPLES - 1, MIN_MW_SAMPLES):
        low, high = np.arange(n), np.arange(n) + n
        p = sps.mannwhitneyu(low, high, alternative="two-sided", method="exact").pvalue
        assert p == pytest.approx(mann_whitney_min_p(n, n))


# verdict


def test_injected_20pct_slowdown_is_worse_for_a_latency() -> None:
    rng = np.random.default_rng(1)
    r = ratio_test(_run_medians(rng, 1.0), _run_medians(rng, 1.2))
    assert r.ci_low < 1.2 < r.ci_high
    assert verdict(r, r.p_welch, higher_is_better=False) == "worse"


def test_injected_20pct_speedup_is_better_for_a_latency() -> None:
    rng = np.random.default_rng(2)
    r = ratio_test(_run_medians(rng, 1.0), _run_medians(rng, 1 / 1.2))
    assert verdict(r, r.p_welch, higher_is_better=False) == "better"


@pytest.mark.parametrize(("change", "expected"), [(0.8, "worse"), (1.2, "better")])
def test_throughput_change_of_20pct_is_detected_in_the_right_direction(
    change: float, expected: str
) -> None:
    rng = np.random.default_rng(3)
    base = 1000.0 * rng.lognormal(0, RUN_CV, 5)
    cand = change * 1000.0 * rng.lognormal(0, RUN_CV, 5)
    r = ratio_test(base, cand)
    assert verdict(r, r.p_welch, higher_is_better=True) == expected


def test_a_significant_change_below_the_threshold_is_not_reported() -> None:
    r = RatioTest(1.03, 1.02, 1.04, 1e-6, None, 5, 5)
    assert verdict(r, r.p_welch, higher_is_better=False) == "~"
    assert verdict(r, r.p_welch, higher_is_better=False, threshold=0.01) == "worse"


def test_a_large_change_that_is_not_significant_is_not_reported() -> None:
    r = RatioTest(1.5, 0.9, 2.5, 0.2, None, 5, 5)
    assert verdict(r, r.p_welch, higher_is_better=False) == "~"


def test_a_nan_p_value_is_not_reported() -> None:
    r = RatioTest(2.0, math.nan, math.nan, math.nan, None, 1, 1)
    assert verdict(r, math.nan, higher_is_better=True) == "~"


@pytest.fixture(scope="module")
def null_tests() -> list[RatioTest]:
    """1000 comparisons of 5 vs 5 runs drawn from the same distribution (3% CV)."""
    tests = []
    for seed in range(1000):
        rng = np.random.default_rng(seed)
        tests.append(ratio_test(rng.lognormal(0, RUN_CV, 5), rng.lognormal(0, RUN_CV, 5)))
    return tests


def test_identical_distributions_are_flagged_at_most_at_rate_alpha(
    null_tests: list[RatioTest],
) -> None:
    flagged = [verdict(t, t.p_welch, False, threshold=0.0) != "~" for t in null_tests]
    # At a true rate of 0.05, 1000 trials have sd sqrt(0.05 * 0.95 / 1000) = 0.0069:
    # allow three of them.
    assert np.mean(flagged) <= 0.05 + 3 * 0.0069


def test_identical_distributions_almost_never_pass_the_5pct_threshold(
    null_tests: list[RatioTest],
) -> None:
    flagged = [verdict(t, t.p_welch, False) != "~" for t in null_tests]
    # A 5% change is ~2.6 standard errors of the log-mean difference (0.03 * sqrt(2/5)), so
    # about 1% of null comparisons pass both tests; 2.5% is five binomial sds above that.
    assert np.mean(flagged) <= 0.025


# holm


def test_holm_textbook_example() -> None:
    # Four hypotheses, p = 0.01, 0.04, 0.03, 0.005. Sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03,
    # 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> raised to 0.06 by the running maximum.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


@settings(derandomize=True, max_examples=200, deadline=None)  # a loaded CI box is slow
@given(st.lists(st.floats(0.0, 1.0), max_size=20))
def test_holm_is_monotone_bounded_and_never_below_the_raw_p(p: list[float]) -> None:
    adjusted = holm(p)
    for raw_a, adj_a in zip(p, adjusted, strict=True):
        for raw_b, adj_b in zip(p, adjusted, strict=True):
            assert raw_a > raw_b or adj_a <= adj_b
    assert all(raw <= adj <= 1.0 for raw, adj in zip(p, adjusted, strict=True))


def test_holm_caps_at_one() -> None:
    assert holm([0.5, 0.6, 0.7]) == [1.0, 1.0, 1.0]


def test_holm_passes_nan_through_without_counting_it() -> None:
    adjusted = holm([math.nan, 0.01, math.nan, 0.02])
    assert math.isnan(adjusted[0]) and math.isnan(adjusted[2])
    assert adjusted[1::2] == holm([0.01, 0.02]) == pytest.approx([0.02, 0.02])


def test_holm_rejects_values_that_are_not_p_values() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.01, 1.5])


# bootstrap_quantile_ratio


def test_bootstrap_point_is_the_ratio_of_pooled_quantiles() -> None:
    rng = np.random.default_rng(4)
    b, c = _latency_runs(rng, 1.0, 0.03), _latency_runs(rng, 1.3, 0.03)
    ratio, low, high = bootstrap_quantile_ratio(b, c, 0.9, n_boot=200)
    assert ratio == pytest.approx(
        np.quantile(np.concatenate(c), 0.9) / np.quantile(np.concatenate(b), 0.9)
    )
    assert low < ratio < high


def test_bootstrap_of_identical_inputs_gives_one_inside_the_interval() -> None:
    runs = _latency_runs(np.random.default_rng(5), 1.0, 0.03)
    ratio, low, high = bootstrap_quantile_ratio(runs, runs, 0.99, n_boot=500)
    assert ratio == 1.0 and low < 1.0 < high


def test_bootstrap_interval_covers_the_true_ratio_at_about_the_nominal_rate() -> None:
    # Candidate = baseline distribution x 1.2, so every quantile's true ratio is exactly 1.2.
    # Measured with 400 reps at this design: ~98% (the within-run noise enters twice, once
    # through the resampled runs and once through the resampled requests). 60 reps at a true
    # 95% have sd 2.8%; 85% is 3.5 sds below.
    reps, hits, excludes_one = 60, 0, 0
    for seed in range(reps):
        rng = np.random.default_rng(seed)
        b, c = _latency_runs(rng, 1.0, 0.03), _latency_runs(rng, 1.2, 0.03)
        _, low, high = bootstrap_quantile_ratio(b, c, 0.9, n_boot=300, seed=seed)
        hits += low <= 1.2 <= high
        excludes_one += not low <= 1.0 <= high
    assert hits / reps >= 0.85
    assert excludes_one / reps >= 0.9  # and it is narrow enough to see the change


def _hierarchical_over_pooled_width(run_sd: float) -> float:
    rng = np.random.default_rng(6)
    b, c = _latency_runs(rng, 1.0, run_sd), _latency_runs(rng, 1.0, run_sd)
    _, low, high = bootstrap_quantile_ratio(b, c, 0.5, n_boot=1000)
    # One "run" holding every request: resampling requests only, as if they were independent.
    _, p_low, p_high = bootstrap_quantile_ratio(
        [np.concatenate(b)], [np.concatenate(c)], 0.5, n_boot=1000
    )
    return math.log(high / low) / math.log(p_high / p_low)


def test_hierarchical_bootstrap_is_wider_than_pooled_when_runs_differ() -> None:
    # Over 20 seeds the width ratio was 3.6-7.1 with a 30% run effect and 1.2-2.0 without one
    # (resampling requests inside resampled runs counts their noise twice: about sqrt(2)).
    assert _hierarchical_over_pooled_width(0.3) > 2.5
    assert _hierarchical_over_pooled_width(0.0) < 2.5


def test_bootstrap_is_reproducible_for_a_seed() -> None:
    runs = _latency_runs(np.random.default_rng(7), 1.0, 0.03)
    same = bootstrap_quantile_ratio(runs, runs, 0.9, n_boot=200, seed=3)
    assert same == bootstrap_quantile_ratio(runs, runs, 0.9, n_boot=200, seed=3)
    assert same != bootstrap_quantile_ratio(runs, runs, 0.9, n_boot=200, seed=4)


def test_bootstrap_handles_runs_of_different_lengths_and_drops_empty_ones() -> None:
    rng = np.random.default_rng(8)
    b = [list(rng.lognormal(4, 0.3, n)) for n in (50, 120, 80)]
    c = [list(rng.lognormal(4.2, 0.3, n)) for n in (90, 30, 200)]
    with_empty = bootstrap_quantile_ratio([*b, [], [math.nan]], c, 0.9, n_boot=300)
    assert with_empty == bootstrap_quantile_ratio(b, c, 0.9, n_boot=300)
    ratio, low, high = with_empty
    assert low < math.exp(0.2) < high and low < ratio < high


def test_bootstrap_rejects_values_that_are_not_positive() -> None:
    with pytest.raises(ValueError, match="baseline run 1: ratios need finite values > 0"):
        bootstrap_quantile_ratio([[1.0, 2.0], [0.0, 3.0]], [[1.0, 2.0]], 0.5)


def test_bootstrap_without_any_values_raises() -> None:
    with pytest.raises(ValueError, match="candidate: no run has any values"):
        bootstrap_quantile_ratio([[1.0, 2.0]], [[], [math.nan]], 0.5)


def test_row_quantiles_match_numpy_on_nan_padded_rows() -> None:
    rng = np.random.default_rng(9)
    rows = rng.random((50, 40))
    for i, n in enumerate(rng.integers(1, 41, 50)):
        rows[i, n:] = np.nan
        rows[i] = rng.permutation(rows[i])
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        expected = [np.quantile(r[~np.isnan(r)], q) for r in rows]
        np.testing.assert_allclose(_row_quantiles(rows, q), expected, rtol=1e-12)


# sample-size rules


def test_p99_needs_hundreds_of_samples() -> None:
    assert min_samples_for_quantile(0.99) >= 100


@pytest.mark.parametrize(("q", "expected"), [(0.5, 6), (0.9, 36), (0.99, 368), (0.1, 36)])
def test_min_samples_is_where_a_distribution_free_interval_first_fits(
    q: float, expected: int
) -> None:
    # n is the first size at which the sample maximum lies above the true q-quantile (and the
    # minimum below it) with probability >= 97.5%; the median's 6 is benchstat's minimum.
    n = min_samples_for_quantile(q)
    assert n == expected
    assert max(q, 1 - q) ** n <= 0.025 < max(q, 1 - q) ** (n - 1)


def test_min_quantile_samples_table_follows_the_rule() -> None:
    rule = {q: min_samples_for_quantile(q) for q in (0.5, 0.9, 0.99)}
    assert rule == MIN_QUANTILE_SAMPLES


# geomean


def test_geomean() -> None:
    assert geomean([1.0, 100.0, math.nan]) == pytest.approx(10.0)


def test_geomean_of_a_zero_raises() -> None:
    with pytest.raises(ValueError, match="> 0"):
        geomean([0.0, 1.0])


# session_ratio_test


def _sessions(rng: np.random.Generator, shifts: list[float], repeats: int = 3) -> list[list[float]]:
    """Per-run values of sessions around 100, each moved by its shift, repeats 1% apart."""
    return [list(100.0 * shift * rng.lognormal(0.0, 0.01, repeats)) for shift in shifts]


def test_a_candidate_session_is_tested_against_the_spread_of_the_baseline_sessions() -> None:
    base = [[90.0, 91.0], [100.0, 101.0], [110.0, 111.0]]
    cand = [[120.0, 121.0]]
    r = session_ratio_test(base, cand, default_sd=0.5)
    logs = [np.log(s) for s in base]
    means = np.array([m.mean() for m in logs])
    diff = np.log(cand[0]).mean() - np.concatenate(logs).mean()
    # The prediction-interval test: one new observation against k = 3 earlier ones, df = k - 1.
    t = diff / (means.std(ddof=1) * math.sqrt(1 + 1 / 3))
    assert r.p_welch == pytest.approx(2 * sps.t.sf(abs(t), 2))
    assert r.ratio == pytest.approx(math.exp(diff))
    half = sps.t.ppf(0.975, 2) * means.std(ddof=1) * math.sqrt(1 + 1 / 3)
    assert (r.ci_low, r.ci_high) == pytest.approx((math.exp(diff - half), math.exp(diff + half)))
    assert r.sessions == (3, 1) and r.default_session_sd is None
    assert (r.n_baseline, r.n_candidate) == (6, 2)


def test_a_session_shift_within_the_baseline_spread_is_not_significant_but_welch_calls_it() -> None:
    rng = np.random.default_rng(0)
    base = _sessions(rng, [1.10, 0.90, 1.10, 0.90, 1.0])
    cand = _sessions(rng, [0.90])
    per_run = ratio_test([v for s in base for v in s], cand[0])
    per_session = session_ratio_test(base, cand, default_sd=0.05)
    assert per_run.p_welch < 0.001  # repeats of one session look like a real change
    assert per_session.p_welch > 0.2
    assert per_session.ratio == pytest.approx(per_run.ratio)


def test_a_shift_beyond_the_spread_between_sessions_is_significant() -> None:
    rng = np.random.default_rng(1)
    r = session_ratio_test(
        _sessions(rng, [1.03, 0.97, 1.03, 0.97, 1.0]), _sessions(rng, [1.3]), default_sd=0.05
    )
    assert r.p_welch < 0.01 and r.ci_low > 1.15


def test_one_session_a_side_uses_the_default_spread_with_the_within_session_error() -> None:
    base, cand = [[100.0, 102.0, 98.0]], [[110.0, 111.0, 109.0]]
    r = session_ratio_test(base, cand, default_sd=0.05)
    b, c = np.log(base[0]), np.log(cand[0])
    vb, vc = b.var(ddof=1) / 3, c.var(ddof=1) / 3
    se = math.sqrt(2 * 0.05**2 + vb + vc)
    df = (2 * 0.05**2 + vb + vc) ** 2 / (vb**2 / 2 + vc**2 / 2)
    assert r.p_welch == pytest.approx(2 * sps.t.sf((c.mean() - b.mean()) / se, df))
    assert r.sessions == (1, 1) and r.default_session_sd == 0.05
    # The default is what makes it not significant: without it, three tight repeats would be.
    assert r.p_welch > 0.05 > ratio_test(base[0], cand[0]).p_welch


def test_several_candidate_sessions_pool_the_spread_of_both_builds() -> None:
    base, cand = [[100.0], [110.0]], [[120.0], [130.0]]
    r = session_ratio_test(base, cand, default_sd=0.5)
    ref = sps.ttest_ind(np.log([120.0, 130.0]), np.log([100.0, 110.0]), equal_var=True)
    assert r.p_welch == pytest.approx(ref.pvalue)
    assert r.sessions == (2, 2) and r.default_session_sd is None


def test_sessions_without_spread_take_the_zero_noise_limit() -> None:
    same = session_ratio_test([[5.0, 5.0], [5.0]], [[5.0]], default_sd=0.1)
    moved = session_ratio_test([[5.0, 5.0], [5.0]], [[6.0]], default_sd=0.1)
    assert (same.p_welch, moved.p_welch) == (1.0, 0.0)
    assert moved.ci_low == moved.ci_high == pytest.approx(1.2)


def test_mann_whitney_needs_several_session_means_per_side() -> None:
    rng = np.random.default_rng(2)
    base = _sessions(rng, [1.0, 1.01, 0.99, 1.0])
    assert session_ratio_test(base, _sessions(rng, [1.5]), default_sd=0.05).p_mannwhitney is None
    four = session_ratio_test(base, _sessions(rng, [1.5] * 4), default_sd=0.05)
    assert four.p_mannwhitney == pytest.approx(mann_whitney_min_p(4, 4))


def test_a_session_with_a_value_that_is_not_positive_raises() -> None:
    with pytest.raises(ValueError, match="finite values > 0"):
        session_ratio_test([[1.0], [0.0]], [[1.0]], default_sd=0.05)


@pytest.mark.parametrize(
    ("column", "family"),
    [
        ("output_throughput", "throughput"),
        ("request_throughput", "throughput"),
        ("ttft_ms_p50", "p50 latency"),
        ("itl_ms_p99", "p99 latency"),
        ("load_time_s", "load time"),
    ],
)
def test_each_compared_metric_has_a_default_spread_family(column: str, family: str) -> None:
    assert session_sd_family(column) == family
