"""A named baseline keeps sessions: saving again adds one, and the newest `keep` stay."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import baseline, compare, store
from bench.store import RunStore
from tests.synthetic import request_record, run_record


def _session(root: Path, run_id: str, scenario: str = "short_qa") -> Path:
    """A finished run directory of one level, 2 repeats: one session of `scenario`."""
    out = RunStore(root, run_id)
    out.runs = [run_record(run_id=run_id, scenario=scenario, repeat=r) for r in range(2)]
    out.requests = [request_record(run_id=run_id, scenario=scenario, repeat=r) for r in range(2)]
    out.flush()
    return out.dir


def _manifest_ids(home: Path) -> list[str]:
    return [e["run_id"] for e in json.loads((home / "manifest.json").read_text())["runs"]]


def test_saving_twice_keeps_two_sessions(tmp_path: Path) -> None:
    root = tmp_path / "baselines"
    for run_id in ("s1", "s2"):
        home = baseline.save(_session(tmp_path / "runs", run_id), "main", root, keep=5)
    assert _manifest_ids(home) == ["s1", "s2"]
    assert [e.run_id for e in baseline.sessions(home)["short_qa"]] == ["s1", "s2"]
    assert sorted(baseline.run_dirs("main", root)) == [home / "s1", home / "s2"]


def test_saving_seven_times_with_keep_five_keeps_the_newest_five(tmp_path: Path) -> None:
    root = tmp_path / "baselines"
    ids = [f"s{i}" for i in range(7)]
    for run_id in ids:
        home = baseline.save(_session(tmp_path / "runs", run_id), "main", root, keep=5)
    assert _manifest_ids(home) == ids[2:]
    assert sorted(p.name for p in home.iterdir() if p.is_dir()) == ids[2:]


def test_keep_counts_sessions_per_scenario(tmp_path: Path) -> None:
    root = tmp_path / "baselines"
    runs = tmp_path / "runs"
    baseline.save(_session(runs, "qa1"), "main", root, keep=1)
    baseline.save(_session(runs, "c1", scenario="concurrency"), "main", root, keep=1)
    home = baseline.save(_session(runs, "qa2"), "main", root, keep=1)
    sessions = baseline.sessions(home)
    assert {k: [e.run_id for e in v] for k, v in sessions.items()} == {
        "concurrency": ["c1"],
        "short_qa": ["qa2"],
    }


def test_saving_the_same_run_again_replaces_it_rather_than_adding_a_session(
    tmp_path: Path,
) -> None:
    run = _session(tmp_path / "runs", "s1")
    baseline.save(run, "main", tmp_path / "baselines", keep=5)
    home = baseline.save(run, "main", tmp_path / "baselines", keep=5)
    assert _manifest_ids(home) == ["s1"]


def test_keep_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"baseline\.keep"):
        baseline.save(_session(tmp_path / "runs", "s1"), "main", tmp_path / "b", keep=0)


def test_a_baseline_of_one_run_per_scenario_loads_as_one_session_each(tmp_path: Path) -> None:
    # The layout a baseline had when saving replaced the scenario's run: one run directory
    # per scenario beside a manifest that lists it.
    home = tmp_path / "baselines" / "main"
    home.mkdir(parents=True)
    shutil.copytree(_session(tmp_path / "runs", "old"), home / "old")
    entry = baseline.entry_of(store.load(home / "old").runs, home / "old")
    document = {"name": "main", "updated_at": "2026-01-01T00:00:00+00:00", "runs": [vars(entry)]}
    (home / "manifest.json").write_text(json.dumps(document))
    assert [e.run_id for e in baseline.sessions(home)["short_qa"]] == ["old"]
    side = compare.load_side("baseline", "main", baseline.run_dirs("main", home.parent))
    assert side.side.sessions == 1
    # Saving into it adds a second session beside the old one.
    baseline.save(_session(tmp_path / "runs", "new"), "main", home.parent, keep=5)
    side = compare.load_side("baseline", "main", baseline.run_dirs("main", home.parent))
    assert side.side.sessions == 2
    assert set(side.runs["run_id"]) == {"old", "new"}
