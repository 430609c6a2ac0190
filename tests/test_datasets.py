"""Prompts from local files (bench/datasets.py): every format, sampling, hashing, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench import datasets, runner, workload
from bench.compose import compose
from bench.config import BenchConfig, ConfigError, DatasetConfig

REPO = Path(__file__).resolve().parent.parent


def _cfg(path: Path, *overrides: str) -> BenchConfig:
    return compose("scenario=dataset", f"scenario.dataset.path={path}", *overrides)


def _rows(path: Path, fmt: str = "auto", **columns: str | None) -> list[datasets.Row]:
    overrides = [f"scenario.dataset.format={fmt}"]
    overrides += [f"scenario.dataset.{k}={'null' if v is None else v}" for k, v in columns.items()]
    dataset = _cfg(path, *overrides).scenario.dataset
    assert dataset is not None
    return list(datasets.load(dataset, None).rows)


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sharegpt_prompt_is_the_first_human_turn_and_output_the_reply_in_words(
    tmp_path: Path,
) -> None:
    conversations = [
        {"conversations": [{"from": "gpt", "value": "hello there"},
                           {"from": "human", "value": "why is the sky blue"},
                           {"from": "gpt", "value": "because of scattering"}]},
        {"conversations": [{"from": "human", "value": "unanswered question"}]},
        {"conversations": []},  # skipped, as in the public dump
    ]  # fmt: skip
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(conversations))
    rows = _rows(path)
    assert [(r.prompt, r.input_tokens, r.output_tokens) for r in rows] == [
        ("why is the sky blue", 5, 3),
        ("unanswered question", 2, None),
    ]


def test_sharegpt_lengths_are_counted_in_tokens_with_a_tokenizer(word_tokenizer: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(word_tokenizer, local_files_only=True)
    dataset = _cfg(REPO / "scenarios/data/conversations.json").scenario.dataset
    assert dataset is not None
    row = datasets.load(dataset, tok).rows[0]
    assert row.input_tokens == len(tok.encode(row.prompt, add_special_tokens=False))


def test_jsonl_reads_prompt_and_optional_output_tokens(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a b c", "output_tokens": 7}, {"prompt": "d"}])
    assert [(r.prompt, r.input_tokens, r.output_tokens) for r in _rows(path)] == [
        ("a b c", 3, 7),
        ("d", 1, None),
    ]


def test_csv_reads_named_columns_and_counts_a_reply_text(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('question,answer\n"what, exactly",12\nwhy not,"because it is"\n')
    rows = _rows(path, prompt_column="question", output_column="answer")
    assert [(r.prompt, r.output_tokens) for r in rows] == [("what, exactly", 12), ("why not", 3)]


def test_parquet_reads_named_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["one two", "three"], "n": [5, None]}), path)
    rows = _rows(path, prompt_column="text", output_column="n")
    assert [(r.prompt, r.output_tokens) for r in rows] == [("one two", 5), ("three", None)]


def _save_to_disk(path: Path, table: pa.Table, shards: int = 2) -> Path:
    """The layout Dataset.save_to_disk writes: Arrow IPC stream shards listed in state.json."""
    path.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{shards:05d}.arrow" for i in range(shards)]
    step = -(-len(table) // shards)
    for i, name in enumerate(names):
        with pa.ipc.new_stream(path / name, table.schema) as writer:
            writer.write_table(table.slice(i * step, step))
    (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (path / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return path


def test_a_save_to_disk_directory_is_read_in_its_shards_order(tmp_path: Path) -> None:
    table = pa.table(
        {"prompt": [f"prompt {i}" for i in range(5)], "output_tokens": [1, 2, 3, 4, 5]}
    )
    path = _save_to_disk(tmp_path / "saved", table)
    rows = _rows(path)
    assert [r.prompt for r in rows] == [f"prompt {i}" for i in range(5)]
    assert [r.output_tokens for r in rows] == [1, 2, 3, 4, 5]


def test_the_datasets_package_writes_what_is_read(tmp_path: Path) -> None:
    hf = pytest.importorskip("datasets")
    path = tmp_path / "hf"
    hf.Dataset.from_dict({"prompt": ["x y", "z"], "output_tokens": [3, 4]}).save_to_disk(path)
    assert [(r.prompt, r.output_tokens) for r in _rows(path)] == [("x y", 3), ("z", 4)]


def test_a_dataset_dict_asks_for_one_split(tmp_path: Path) -> None:
    path = tmp_path / "dd"
    _save_to_disk(path / "train", pa.table({"prompt": ["a"]}), shards=1)
    (path / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(ConfigError, match=r"DatasetDict of splits \(train\).*dd/train"):
        _rows(path)


def test_a_line_that_is_not_json_is_named(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "ok"}\n\n{"prompt": oops}\n')
    with pytest.raises(ConfigError, match=r"^data\.jsonl line 3: not JSON"):
        _rows(path)


def test_a_line_without_the_prompt_is_named(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "data.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(ConfigError, match=r"^data\.jsonl line 2: missing 'prompt'"):
        _rows(path)


def test_a_bad_output_length_is_named(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "data.jsonl", [{"prompt": "ok", "output_tokens": 0}])
    with pytest.raises(ConfigError, match=r"line 1: 'output_tokens' must be a token count >= 1"):
        _rows(path)


def test_a_csv_without_the_column_lists_its_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("question\nwhy\n")
    with pytest.raises(ConfigError, match=r"no column 'prompt' .*columns are question"):
        _rows(path)


def test_a_parquet_row_with_an_empty_prompt_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["fine", "  "]}), path)
    with pytest.raises(ConfigError, match=r"^d\.parquet row 1: 'prompt' must be a non-empty"):
        _rows(path)


def test_a_malformed_sharegpt_conversation_is_named(tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}]}, {"x": 1}]))
    with pytest.raises(ConfigError, match=r"chat\.json conversation 1: missing 'conversations'"):
        _rows(path)


def test_a_missing_file_and_an_unknown_suffix_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"scenario\.dataset\.path: no such file"):
        _cfg(tmp_path / "nope.jsonl")
    odd = tmp_path / "d.txt"
    odd.write_text("x")
    with pytest.raises(ConfigError, match=r"scenario\.dataset\.format: auto cannot tell"):
        _cfg(odd)


def test_length_distribution_dataset_needs_a_dataset() -> None:
    with pytest.raises(ConfigError, match=r"scenario\.length_distribution=dataset .*dataset\.path"):
        compose("scenario.length_distribution=dataset")


def test_sampling_is_deterministic_under_the_seed_and_without_replacement_while_it_lasts(
    tmp_path: Path,
) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}"} for i in range(10)])

    def prompts(seed: int) -> list[object]:
        cfg = _cfg(path, f"seed={seed}", "scenario.num_requests=15")
        w = workload.build(cfg.scenario, cfg.workload, cfg.seed, text=False)
        return [s.prompt for s in w.batches[0, 0]]

    first = prompts(0)
    assert first == prompts(0) != prompts(1)
    assert len(set(first[:10])) == 10  # every row once before any twice
    assert len(set(first)) == 10


def test_prompts_are_text_and_outputs_the_rows_own(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "x y z", "output_tokens": 9}, {"prompt": "w"}])
    cfg = _cfg(path, "scenario.output_tokens=4")
    specs = workload.build(cfg.scenario, cfg.workload, cfg.seed, text=False).batches[0, 0]
    assert {(s.prompt, s.input_tokens, s.output_tokens) for s in specs} == {
        ("x y z", 3, 9),
        ("w", 1, 9),  # a row without one: the level's, the mean of the rows that tell one
    }
    assert cfg.scenario.levels()[0].label == "2/9 c=1"  # the file's mean lengths


def test_a_file_without_output_lengths_takes_the_scenarios(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "x y z"}, {"prompt": "w"}])
    cfg = _cfg(path, "scenario.output_tokens=4")
    specs = workload.build(cfg.scenario, cfg.workload, cfg.seed, text=False).batches[0, 0]
    assert {s.output_tokens for s in specs} == {4}


def test_other_distributions_draw_the_output_lengths(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "output_tokens": 9}])
    cfg = _cfg(path, "scenario.length_distribution=fixed", "scenario.output_tokens=4")
    specs = workload.build(cfg.scenario, cfg.workload, cfg.seed, text=False).batches[0, 0]
    assert {s.output_tokens for s in specs} == {4}


def test_the_workload_hash_covers_the_files_content(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "same prompt"}, {"prompt": "other"}])

    def digest() -> str:
        cfg = _cfg(path)
        return workload.build(cfg.scenario, cfg.workload, cfg.seed, text=False).digest

    before = digest()
    assert digest() == before
    # Whitespace only: the same prompts are sent, but the file is another one.
    path.write_text(path.read_text().replace('": "', '":  "'))
    assert digest() != before


def test_the_demo_file_is_what_the_generator_writes(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks/make_sample_data.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in ("conversations.json", "trace.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "scenarios/data" / name).read_bytes()


def test_the_demo_file_has_a_few_hundred_conversations_of_varied_lengths() -> None:
    dataset = compose("scenario=dataset").scenario.dataset
    assert dataset == DatasetConfig(
        "scenarios/data/conversations.json", "sharegpt", "prompt", "output_tokens"
    )
    rows = datasets.load(dataset, None).rows
    lengths = sorted(r.input_tokens for r in rows)
    assert len(rows) == 256 and lengths[0] < 10 and lengths[-1] > 100
    assert all(r.output_tokens for r in rows)


@pytest.mark.slow
def test_a_dataset_run_sends_the_rows_as_text_prompts(tmp_path: Path) -> None:
    cfg = compose(
        "scenario=dataset", "target=refserver", f"results_dir={tmp_path}", "progress=false",
        "scenario.repeats=1", "scenario.num_requests=12",
    )  # fmt: skip
    specs = workload.build(cfg.scenario, cfg.workload, cfg.seed, text=False).batches[0, 0]
    result = runner.run(cfg)
    for r in result.requests:
        spec = specs[r.index]
        assert r.ok and isinstance(spec.prompt, str)
        # The reference server counts a text prompt's words, as the harness does without a
        # tokenizer; the outputs are the conversations' replies' lengths.
        assert r.prompt_tokens == r.input_tokens == spec.input_tokens
        assert r.output_tokens == spec.output_tokens
