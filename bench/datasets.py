"""Prompts from local files: ShareGPT JSON, JSONL, CSV, Parquet and `save_to_disk` directories.

Every format becomes the same rows: a prompt text and, where the file tells it, the output
length. Lengths are counted in tokens where target.tokenizer is set, else in words (the
server's usage then reports the real prompt length in `prompt_tokens`). A row that is not what
the format promises raises ConfigError naming the file and the line (text formats, from 1, as
editors count) or the row (tables, from 0, as pandas and `datasets` index them).

A Hugging Face dataset saved with `Dataset.save_to_disk` is read with pyarrow directly, without
the `datasets` package: the directory holds the table as Arrow IPC stream files
(`data-00000-of-0000N.arrow`, in the order state.json lists) beside dataset_info.json.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.config import ConfigError, DatasetConfig


class _Counter(Protocol):
    """A tokenizer, as far as counting goes (a Hugging Face tokenizer is one)."""

    def __hash__(self) -> int: ...  # parsed rows are cached per tokenizer
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Row:
    prompt: str
    input_tokens: int  # the tokenizer's count, else words
    output_tokens: int | None  # None: the file does not tell


@dataclass(frozen=True)
class Dataset:
    path: str
    sha256: str  # of the file's bytes (a directory: of every file's name and bytes)
    rows: tuple[Row, ...]


def load(cfg: DatasetConfig, tokenizer: _Counter | None) -> Dataset:
    """The rows of the dataset `cfg` names; parsed once per content, format and tokenizer."""
    return _parse(cfg, _sha256(Path(cfg.path)), tokenizer)


def sample(rng: np.random.Generator, rows: int, n: int) -> list[int]:
    """`n` row indices: without replacement while the rows last, then through them again in a
    fresh order, so a small file still fills a long run."""
    picks: list[int] = []
    while len(picks) < n:
        picks.extend(int(i) for i in rng.permutation(rows)[: n - len(picks)])
    return picks


def count(text: str, tokenizer: _Counter | None) -> int:
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer.encode(text, add_special_tokens=False))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + b"\0")
            h.update(f.read_bytes())
    else:
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=4)
def _parse(cfg: DatasetConfig, sha256: str, tokenizer: _Counter | None) -> Dataset:
    path = Path(cfg.path)
    readers = {"sharegpt": _sharegpt, "jsonl": _jsonl, "csv": _csv, "parquet": _table,
               "arrow": _table}  # fmt: skip
    rows = tuple(
        Row(prompt, count(prompt, tokenizer), _output_tokens(output, tokenizer))
        for prompt, output in readers[cfg.format](path, cfg)
    )
    if not rows:
        raise ConfigError(f"{path.name}: no usable prompt in the file (scenario.dataset.path)")
    return Dataset(cfg.path, sha256, rows)


def _output_tokens(output: int | str | None, tokenizer: _Counter | None) -> int | None:
    if output is None or isinstance(output, int):
        return output
    return max(1, count(output, tokenizer))


# Each reader yields (prompt, output) per row: output a token count, a reply text or None.
Pair = tuple[str, int | str | None]
Pairs = Iterator[Pair]


def _sharegpt(path: Path, cfg: DatasetConfig) -> Pairs:
    """The first human turn, and the reply that follows it. Conversations without a human turn
    (the public ShareGPT dump has some) are skipped; a malformed one is an error."""
    try:
        items = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path.name}: not JSON ({exc}); ShareGPT is one JSON list") from None
    if not isinstance(items, list):
        raise ConfigError(f"{path.name}: expected a JSON list of conversations (ShareGPT)")
    for number, item in enumerate(items):
        where = f"{path.name} conversation {number}"
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list):
            raise ConfigError(f"{where}: missing 'conversations' (a list of turns)")
        for turn in turns:
            if not (
                isinstance(turn, dict)
                and isinstance(turn.get("from"), str)
                and isinstance(turn.get("value"), str)
            ):
                raise ConfigError(f"{where}: a turn is not {{'from': str, 'value': str}}")
        first = next((i for i, t in enumerate(turns) if t["from"] == "human"), None)
        if first is None or not turns[first]["value"].strip():
            continue
        reply = turns[first + 1] if first + 1 < len(turns) else None
        answered = reply is not None and reply["from"] == "gpt" and reply["value"].strip()
        yield turns[first]["value"], reply["value"] if answered and reply else None


def _jsonl(path: Path, cfg: DatasetConfig) -> Pairs:
    text = path.read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield _pair(row, cfg, where)


def _csv(path: Path, cfg: DatasetConfig) -> Pairs:
    reader = csv.DictReader(io.StringIO(path.read_bytes().decode("utf-8", errors="replace")))
    _check_columns(path, reader.fieldnames or [], cfg)
    for row in reader:
        # A cell is text: a whole number is a token count, other text a reply, empty none.
        cells: dict[str, object] = {**row}
        cell = row.get(cfg.output_column) if cfg.output_column else None
        if cfg.output_column:
            cells[cfg.output_column] = (
                int(cell) if cell and cell.strip().isdigit() else (cell or None)
            )
        yield _pair(cells, cfg, f"{path.name} line {reader.line_num}")


def _table(path: Path, cfg: DatasetConfig) -> Pairs:
    table = _parquet(path) if cfg.format == "parquet" else _arrow(path)
    _check_columns(path, table.column_names, cfg)
    prompts = table.column(cfg.prompt_column).to_pylist()
    outputs: Iterable[object] = (
        table.column(cfg.output_column).to_pylist()
        if cfg.output_column in table.column_names
        else [None] * len(prompts)
    )
    for number, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
        row = {cfg.prompt_column: prompt, cfg.output_column: output}
        yield _pair(row, cfg, f"{path.name} row {number}")


def _parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"{path.name}: not a Parquet file ({exc})") from None


def _arrow(path: Path) -> pa.Table:
    """A `save_to_disk` directory (its data files in state.json's order) or one .arrow file."""
    if (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise ConfigError(
            f"{path.name}: a DatasetDict of splits ({', '.join(splits)}); point "
            f"scenario.dataset.path at one of them, e.g. {path}/{splits[0] if splits else 'train'}"
        )
    files = [path]
    if path.is_dir():
        state = path / "state.json"
        if state.exists():
            listed = json.loads(state.read_text()).get("_data_files", [])
            files = [path / f["filename"] for f in listed]
        else:
            files = sorted(path.glob("*.arrow"))
        if not files:
            raise ConfigError(f"{path}: no .arrow data files (expected Dataset.save_to_disk's)")
    tables = []
    for f in files:
        try:  # save_to_disk writes the IPC stream format; other tools write the file format
            tables.append(pa.ipc.open_stream(f.read_bytes()).read_all())
        except pa.ArrowInvalid:
            try:
                tables.append(pa.ipc.open_file(f).read_all())
            except pa.ArrowInvalid as exc:
                raise ConfigError(f"{f.name}: not an Arrow IPC file ({exc})") from None
    return pa.concat_tables(tables)


def _check_columns(path: Path, columns: Sequence[str], cfg: DatasetConfig) -> None:
    if cfg.prompt_column not in columns:
        raise ConfigError(
            f"{path.name}: no column {cfg.prompt_column!r} (scenario.dataset.prompt_column); "
            f"its columns are {', '.join(columns)}"
        )


def _pair(row: Mapping[Any, object], cfg: DatasetConfig, where: str) -> Pair:
    """A row's (prompt, output); a missing or null output leaves the scenario's output lengths
    to stand in."""
    prompt = row.get(cfg.prompt_column)
    if prompt is None:
        raise ConfigError(f"{where}: missing {cfg.prompt_column!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"{where}: {cfg.prompt_column!r} must be a non-empty string")
    output = row.get(cfg.output_column) if cfg.output_column else None
    if output is None or (isinstance(output, str) and output.strip()):
        return prompt, output
    if isinstance(output, int) and not isinstance(output, bool) and output >= 1:
        return prompt, output
    raise ConfigError(
        f"{where}: {cfg.output_column!r} must be a token count >= 1 or a reply text, got {output!r}"
    )
