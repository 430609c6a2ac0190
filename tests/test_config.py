from __future__ import annotations

import pytest

from bench.config import ConfigError
from bench.config import compose as bench_cfg


@pytest.mark.parametrize("name", ["short_qa", "long_generation", "concurrency", "lengths"])
def test_every_scenario_composes_and_validates(name: str) -> None:
    cfg = bench_cfg(f"scenario={name}")
    assert cfg.scenario.name == name
    assert cfg.scenario.repeats == 5
    assert cfg.scenario.levels()


def test_concurrency_scenario_sweeps_four_levels_at_64_in_128_out() -> None:
    levels = bench_cfg("scenario=concurrency").scenario.levels()
    assert [lv.concurrency for lv in levels] == [1, 2, 4, 8]
    assert {(lv.input_tokens, lv.output_tokens) for lv in levels} == {(64, 128)}


def test_lengths_scenario_zips_inputs_with_outputs() -> None:
    shapes = bench_cfg("scenario=lengths").scenario.shapes()
    assert shapes == [(512, 256), (1024, 512), (2048, 1024)]


def test_command_line_overrides_reach_the_scenario() -> None:
    cfg = bench_cfg(
        "scenario=short_qa",
        "scenario.concurrency=[1,8]",
        "scenario.num_requests=7",
        "scenario.input_tokens=100",
        "scenario.output_tokens=20",
        "scenario.repeats=3",
        "scenario.warmup_requests=0",
        "target.endpoint=chat",
    )
    sc = cfg.scenario
    assert [lv.concurrency for lv in sc.levels()] == [1, 8]
    assert (sc.num_requests, sc.repeats, sc.warmup_requests) == (7, 3, 0)
    assert sc.shapes() == [(100, 20)]
    assert cfg.target.endpoint == "chat"


def test_request_rate_switches_to_open_loop_levels() -> None:
    levels = bench_cfg("scenario.request_rate=[2,4.5]", "scenario.max_concurrency=16").scenario
    assert [(lv.request_rate, lv.concurrency) for lv in levels.levels()] == [(2.0, 16), (4.5, 16)]


def test_bad_value_names_the_key_and_what_was_expected() -> None:
    with pytest.raises(ConfigError, match=r"scenario\.concurrency: expected an integer >= 1"):
        bench_cfg("scenario.concurrency=abc")


def test_bad_endpoint_lists_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"target\.endpoint: expected one of completions, chat"):
        bench_cfg("target.endpoint=embeddings")


def test_length_lists_of_different_sizes_are_refused() -> None:
    with pytest.raises(ConfigError, match="equal lengths"):
        bench_cfg("scenario=lengths", "scenario.output_tokens=[1,2]")


def test_base_url_must_be_http() -> None:
    with pytest.raises(ConfigError, match=r"target\.base_url"):
        bench_cfg("target.base_url=localhost:8000")


def test_the_recorded_config_masks_the_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    cfg = bench_cfg("target=openai")
    assert cfg.target.api_key == "sk-secret"
    assert "sk-secret" not in cfg.resolved_yaml and "api_key: '***'" in cfg.resolved_yaml
