from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import compose
from bench.compose import compose as bench_cfg
from bench.config import ConfigError, LoadLevel
from runtime import model_names


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


# --- Unknown keys, unknown files and wrong types are refused while composing ---------------------


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_a_misspelt_key_names_the_closest_valid_key(prefix: str) -> None:
    """With or without `+`: a leading + must not turn a typo into a silently ignored key."""
    with pytest.raises(ConfigError) as err:
        bench_cfg(f"{prefix}scenario.concurency=[1]")
    assert str(err.value) == "scenario.concurency: no such key; did you mean scenario.concurrency?"


def test_a_misspelt_group_key_suggests_the_whole_corrected_key() -> None:
    with pytest.raises(ConfigError, match=r"did you mean scenario\.concurrency\?"):
        bench_cfg("scenaro.concurrency=1")


def test_an_unknown_key_without_a_close_match_lists_the_keys_at_its_level() -> None:
    with pytest.raises(ConfigError, match=r"^zzz: no such key; the keys at the top are .*seed"):
        bench_cfg("+zzz=1")


@pytest.mark.parametrize(
    ("override", "files"),
    [
        (
            "scenario=nope",
            "capacity, concurrency, dataset, lengths, long_generation, multi_turn, shared_prefix, "
            "short_qa, trace_replay",
        ),
        ("target=nope", "bundled, openai, refserver"),
    ],
)
def test_an_unknown_group_file_lists_the_files_there(override: str, files: str) -> None:
    group = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        bench_cfg(override)
    assert str(err.value).startswith(f"{override}: no such {group};")
    assert str(err.value).endswith(f"the {group} files in scenarios/{group}/ are {files}")


def test_a_nearly_right_scenario_name_is_suggested() -> None:
    with pytest.raises(ConfigError, match=r"did you mean scenario=short_qa\?"):
        bench_cfg("scenario=short-qa")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("scenario.num_requests=abc", "scenario.num_requests: expected an integer, got 'abc'"),
        ("scenario.num_requests=null", "scenario.num_requests: expected an integer, got None"),
        ("slo.ttft_ms=fast", "slo.ttft_ms: expected a number or null, got 'fast'"),
        ("progress=maybe", "progress: expected true or false, got 'maybe'"),
        ("client.request_timeout_s=[1,2]", "client.request_timeout_s: expected a number, got"),
    ],
)
def test_a_wrong_type_names_the_key_and_the_expected_type(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        bench_cfg(override)


def test_an_unparsable_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"cannot parse 'scenario\.concurrency=\[1'"):
        bench_cfg("scenario.concurrency=[1")


def test_the_schema_keys_cannot_be_deleted() -> None:
    with pytest.raises(ConfigError, match=r"~scenario\.description: the schema needs every key"):
        bench_cfg("~scenario.description")


# --- The bundled engine's knobs -------------------------------------------------------------


def test_engine_knobs_reach_the_bundled_target_as_server_args() -> None:
    args = bench_cfg("target=bundled", "runtime.max_num_seqs=8").target.server_args
    assert args["max_num_seqs"] == 8 and args["log_level"] == "warning"


@pytest.mark.parametrize("prefix", ["", "+"])
def test_a_misspelt_engine_knob_names_the_closest_knob(prefix: str) -> None:
    with pytest.raises(ConfigError) as err:
        bench_cfg("target=bundled", f"{prefix}runtime.max_num_seq=8")
    assert str(err.value) == "runtime.max_num_seq: no such key; did you mean runtime.max_num_seqs?"


def test_a_wrong_engine_knob_type_names_the_knob() -> None:
    with pytest.raises(ConfigError, match=r"^runtime\.max_num_seqs: expected an integer or null"):
        bench_cfg("target=bundled", "runtime.max_num_seqs=many")


@pytest.mark.parametrize("override", ["runtime.max_num_seqs=8", "+runtime.x=1"])
@pytest.mark.parametrize("target", ["openai", "refserver"])
def test_engine_knobs_without_the_bundled_engine_are_refused(target: str, override: str) -> None:
    with pytest.raises(ConfigError, match=rf"no such key with target={target}; .*target=bundled"):
        bench_cfg(f"target={target}", override)


# --- Free-form mappings ------------------------------------------------------------------------


def test_a_free_form_mapping_takes_new_keys_with_plus() -> None:
    assert bench_cfg("+target.extra_body.temperature=0").target.extra_body == {"temperature": 0}
    assert bench_cfg("+target.extra_body={top_p:1}").target.extra_body == {"top_p": 1}


def test_a_new_key_in_a_free_form_mapping_without_plus_says_to_add_it() -> None:
    with pytest.raises(ConfigError, match=r"add it with \+target\.extra_body\.temperature=0$"):
        bench_cfg("target.extra_body.temperature=0")


# --- The bundled engine's model ------------------------------------------------------------------


def test_an_unknown_bundled_model_lists_what_the_engine_accepts() -> None:
    with pytest.raises(ConfigError) as err:
        bench_cfg("target=bundled", "target.model=llama-9000")
    message = str(err.value)
    assert message.startswith("target.model: 'llama-9000' is neither `tiny`, a named ")
    assert "small" in message and "llama-3-8b" in message and "Hugging Face checkpoint" in message


def test_named_architectures_are_the_engine_files_but_tiny() -> None:
    folder = Path(__file__).resolve().parent.parent / "runtime" / "architectures"
    files = {p.stem for p in folder.glob("*.json")}
    assert set(model_names.named_architectures()) == files - {"tiny"}


def test_a_named_architecture_needs_dummy_weights() -> None:
    with pytest.raises(ConfigError, match=r"target\.model: 'small' .* runtime\.load_format=dummy"):
        bench_cfg("target=bundled", "target.model=small")
    cfg = bench_cfg("target=bundled", "target.model=small", "runtime.load_format=dummy")
    assert cfg.target.model == "small"


def test_a_checkpoint_directory_is_a_bundled_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert bench_cfg("target=bundled", f"target.model={tmp_path}").target.model == str(tmp_path)


def test_other_targets_take_any_model_id() -> None:
    assert bench_cfg("target=openai", "target.model=llama-9000").target.model == "llama-9000"


# --- Multirun sweeps -----------------------------------------------------------------------


def test_a_sweep_composes_every_job_in_order() -> None:
    jobs = compose.compose_sweep(["scenario=short_qa,concurrency", "scenario.num_requests=3,4"])
    assert [(j.scenario.name, j.scenario.num_requests) for j in jobs] == [
        ("short_qa", 3), ("short_qa", 4), ("concurrency", 3), ("concurrency", 4),
    ]  # fmt: skip


def test_a_sweep_with_one_bad_job_is_refused_before_any_runs() -> None:
    with pytest.raises(
        ConfigError, match=r"^runtime\.max_num_seqs: no such key with target=openai"
    ):
        compose.compose_sweep(["target=bundled,openai", "runtime.max_num_seqs=2"])


def test_a_level_label_names_its_lengths_and_load() -> None:
    assert LoadLevel(0, 64, 128, 4, None).label == "64/128 c=4"
    assert LoadLevel(1, 64, 128, None, 2.0).label == "64/128 2/s"
    assert LoadLevel(2, 64, 128, 8, 0.5).label == "64/128 0.5/s ≤8"
