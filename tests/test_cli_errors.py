"""A bad command line is refused before anything starts: one line naming the key, exit code 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import __main__ as cli
from bench.config import ConfigError

EXIT_UNUSABLE = 2  # README: nothing measured (a bad config among the reasons)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scenario.concurency=[1]"], "scenario.concurency: no such key; did you mean "
         "scenario.concurrency?"),
        (["scenario=nope"], "the scenario files in scenarios/scenario/ are capacity, concurrency, "
         "dataset, lengths, long_generation, multi_turn, shared_prefix, short_qa, trace_replay"),
        (["target=bundled", "target.model=llama-9000"], "target.model: 'llama-9000' is neither "
         "`tiny`, a named architecture"),
    ],
)  # fmt: skip
def test_a_bad_config_exits_2_with_one_line_naming_the_key(args: list[str], message: str) -> None:
    out = _run("-m", "bench", *args)
    assert out.returncode == EXIT_UNUSABLE
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
    assert message in out.stderr
    assert "To append to your config use +" not in out.stderr


def test_help_still_works() -> None:
    out = _run("-m", "bench", "--help")
    assert out.returncode == 0 and "python -m bench" in out.stdout


def test_a_valid_multirun_passes_the_check_and_reaches_the_run(tmp_path: Path) -> None:
    """The sweep gets past composition to its first job, which finds no server (port 1)."""
    out = _run(
        "-m", "bench", "-m", "scenario=short_qa,concurrency", "target.base_url=http://127.0.0.1:1",
        f"results_dir={tmp_path}", "progress=false",
    )  # fmt: skip
    assert "Launching 2 jobs" in out.stdout + out.stderr
    assert "Cannot reach an OpenAI-compatible server at http://127.0.0.1:1" in out.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "scenario=short_qa,concurrency", "scenario.num_requests=3"],
        ["--cfg", "job", "target=bundled", "runtime.max_num_seqs=8"],
        ["--help"],
        ["--hydra-help"],
    ],
)
def test_the_command_line_check_passes_valid_commands(argv: list[str]) -> None:
    cli.check_command_line(argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-m", "scenario=short_qa,nope"], "scenario=nope: no such scenario"),
        (["-m", "target=bundled,openai", "runtime.max_num_seqs=2"], "with target=openai"),
        (["--cfg", "job", "+scenario.concurency=1"], "did you mean scenario.concurrency?"),
        (["scenario=short_qa,concurrency"], "add --multirun"),
    ],
)
def test_the_command_line_check_refuses_any_bad_job(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        cli.check_command_line(argv)


def test_the_engine_refuses_an_unknown_model_in_one_line_before_serving() -> None:
    out = _run("-m", "runtime", "serve", "--model", "llama-9000", "--port", "0")
    assert out.returncode == EXIT_UNUSABLE
    assert out.stderr.startswith("error: --model 'llama-9000' is neither `tiny`, a named ")
    assert "small" in out.stderr and "--load-format dummy" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1


def test_an_unwritable_results_dir_exits_2_before_the_server_starts(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = _run("-m", "bench", "target=refserver", f"results_dir={blocker}/runs")
    assert out.returncode == EXIT_UNUSABLE
    assert f"error: results_dir {blocker}/runs cannot be written" in out.stderr
    assert "machine speed" not in out.stderr  # nothing ran: not even the speed probe
