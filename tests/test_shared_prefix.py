"""Shared prefixes (scenario=shared_prefix): groups share exactly their prefix, each group's
first request goes first, and the TTFT-by-position figure draws what the requests measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench import figures, runner, workload
from bench.compose import compose
from bench.config import BenchConfig, ConfigError
from bench.records import REQUESTS_SCHEMA, RUNS_SCHEMA, to_table
from tests.synthetic import request_record, run_record


def _build(cfg: BenchConfig, text: bool = False) -> workload.Workload:
    return workload.build(cfg.scenario, cfg.workload, cfg.seed, text)


def _cfg(*overrides: str) -> BenchConfig:
    return compose(
        "scenario=shared_prefix", "scenario.prefix_groups=3", "scenario.prefix_tokens=40",
        "scenario.input_tokens=50", "scenario.num_requests=12", *overrides,
    )  # fmt: skip


def test_a_groups_requests_share_exactly_the_prefix_and_differ_after() -> None:
    cfg = _cfg()
    specs = _build(cfg).batches[0, 0]
    for group in range(3):
        prompts = [s.prompt for s in specs if s.group_id == group]
        assert len(prompts) == 4
        for p in prompts:
            assert isinstance(p, list) and len(p) == 50
            assert p[:40] == prompts[0][:40]
        for p in prompts[1:]:
            assert p[40] != prompts[0][40] and p[40:] != prompts[0][40:]
    heads = {tuple(s.prompt[:40]) for s in specs}
    assert len(heads) == 3  # every group its own prefix


def test_every_groups_first_request_goes_before_its_others() -> None:
    specs = _build(_cfg()).batches[0, 0]
    assert [(s.group_id, s.group_position) for s in specs[:6]] == [
        (0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1),
    ]  # fmt: skip
    first = {}
    for i, s in enumerate(specs):
        first.setdefault(s.group_id, i)
        assert first[s.group_id] <= i and (s.group_position == 0) == (first[s.group_id] == i)


def test_no_repeat_or_level_finds_an_earlier_ones_prefixes() -> None:
    w = _build(_cfg("scenario.concurrency=[1,2]", "scenario.repeats=2"))
    heads = [
        {tuple(s.prompt[:40]) for s in w.batches[key]} for key in [(0, 0), (1, 0), (0, 1), (1, 1)]
    ]
    assert all(a.isdisjoint(b) for i, a in enumerate(heads) for b in heads[i + 1 :])
    assert {tuple(s.prompt[:40]) for s in w.warmup}.isdisjoint(set().union(*heads))


def test_text_prompts_start_with_the_groups_words() -> None:
    specs = _build(_cfg(), text=True).batches[0, 0]
    words = [str(s.prompt).split() for s in specs if s.group_id == 1]
    assert all(len(w) == 50 and w[:40] == words[0][:40] for w in words)


def test_other_scenarios_have_no_groups() -> None:
    specs = _build(compose()).batches[0, 0]
    assert {(s.group_id, s.group_position) for s in specs} == {(None, None)}


def test_the_prefix_must_leave_tokens_of_each_requests_own() -> None:
    with pytest.raises(ConfigError, match=r"scenario\.prefix_tokens: expected fewer than .*\(50\)"):
        _cfg("scenario.prefix_tokens=50")
    with pytest.raises(ConfigError, match=r"scenario\.prefix_tokens: expected an integer >= 1"):
        _cfg("scenario.prefix_tokens=0")


def _figure_build(label: str, ttft: dict[int | None, list[float]]) -> figures.Build:
    """One level's requests through the real schemas: TTFT per position (None: no group)."""
    requests = [
        request_record(index=i, ttft_ms=v, group_id=None if pos is None else i, group_position=pos)
        for pos, values in ttft.items()
        for i, v in enumerate(values)
    ]
    runs = to_table([run_record()], RUNS_SCHEMA).to_pandas()
    return figures.Build(label, runs, to_table(requests, REQUESTS_SCHEMA).to_pandas())


def test_the_figure_draws_ttft_p50_and_p99_per_position() -> None:
    build = _figure_build("run", {0: [100.0, 120.0, 140.0], 1: [10.0, 12.0, 14.0], 2: [11.0]})
    points = figures.ttft_by_position_points(build.requests)
    assert points["position"].tolist() == [0, 1, 2]
    assert points["p50"].tolist() == [120.0, 12.0, 11.0]
    assert points["p99"].tolist() == pytest.approx([139.6, 13.96, 11.0])
    (ax,) = figures._ttft_by_position_figure([build]).axes
    p50, p99 = ax.get_lines()[:2]
    assert list(p50.get_xdata()) == [0, 1, 2] and list(p50.get_ydata()) == [120.0, 12.0, 11.0]
    assert list(p99.get_ydata()) == pytest.approx([139.6, 13.96, 11.0])


def test_all_figures_adds_the_figure_only_where_requests_have_groups(tmp_path: Path) -> None:
    plain = _figure_build("plain", {None: [1.0, 2.0]})
    assert "ttft_by_group_position" not in figures.all_figures([plain], tmp_path / "a")
    grouped = _figure_build("grouped", {0: [5.0], 1: [1.0]})
    made = figures.all_figures([grouped], tmp_path / "b")
    assert made["ttft_by_group_position"].stat().st_size > 0


@pytest.mark.slow
def test_a_shared_prefix_run_records_each_requests_group(tmp_path: Path) -> None:
    cfg = compose(
        "scenario=shared_prefix", "target=refserver", f"results_dir={tmp_path}", "progress=false",
        "scenario.repeats=1", "scenario.num_requests=16", "scenario.prefix_groups=4",
    )  # fmt: skip
    result = runner.run(cfg)
    rows = sorted(result.requests, key=lambda r: r.index)
    assert all(r.ok and r.prompt_tokens == 544 for r in rows)
    assert [(r.group_id, r.group_position) for r in rows[:5]] == [
        (0, 0), (1, 0), (2, 0), (3, 0), (0, 1),
    ]  # fmt: skip
    assert np.all(np.diff([r.sent_s for r in rows]) > 0)  # one user: in the workload's order
