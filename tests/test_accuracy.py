"""The harness against the reference server's truth log (docs/metrics.md, error budget).

Tolerances are the harness's accuracy targets: TTFT error under 2 ms at one user and 10 ms at
64, ITL error under 0.5 ms, output token counts exact. The error is split exactly into uplink
(client send to server handler start) and downlink (server write to client timestamp); see
bench/calibrate.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench import calibrate
from tests.conftest import best_of

pytestmark = pytest.mark.slow


def _within(ttft_ms: float) -> Callable[[calibrate.Calibration], bool]:
    return lambda c: abs(c.ttft_error_ms) < ttft_ms and abs(c.itl_error_ms) < 0.5


def test_single_user_ttft_and_itl_match_the_servers_log() -> None:
    c = best_of(3, lambda: calibrate.measure(concurrency=1, num_requests=8), _within(2.0))
    assert abs(c.ttft_error_ms) < 2.0
    assert abs(c.itl_error_ms) < 0.5
    assert c.tokens_exact == 1.0


def test_64_users_ttft_and_itl_match_the_servers_log() -> None:
    # Mixed output lengths, as real traffic: equal lengths against a zero-variance server keep
    # all 64 users in lockstep, and the server's accept queue then dominates (docs/metrics.md).
    # Eight rounds a user, not four: arrivals need a few rounds to spread out, and a p50 over
    # 512 requests moves less when the VM's host steals the CPU for a moment (CI saw +11 ms
    # twice in a row at 256; on a 2-vCPU VM 2 runs in 17 went over 10 ms at 256, none of 6 at
    # 512).
    c = best_of(
        3,
        lambda: calibrate.measure(concurrency=64, num_requests=512, range_ratio=0.5),
        lambda c: _within(10.0)(c) and c.downlink_p50_ms < 1.0,
    )
    assert c.requests == 512
    assert abs(c.ttft_error_ms) < 10.0
    assert abs(c.itl_error_ms) < 0.5
    assert c.tokens_exact == 1.0
    # The client's own share (server write -> client timestamp) is well under a millisecond.
    assert c.downlink_p50_ms < 1.0


def test_four_tokens_per_event_keep_counts_exact_and_itl_per_token() -> None:
    c = calibrate.measure(concurrency=4, num_requests=16, ttft_ms=50, itl_ms=10,
                          tokens_per_event=4)  # fmt: skip
    assert c.tokens_exact == 1.0
    assert abs(c.itl_error_ms) < 0.5
    # Truth ITL is per token (event gap / 4), not per event.
    assert 9.0 < c.itl_true_p50_ms < 11.5
