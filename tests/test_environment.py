from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import pytest

from bench.environment import Machine, commits_behind, fingerprint
from tests.conftest import git

REPO = Path(__file__).resolve().parent.parent


def test_fingerprint_describes_this_machine() -> None:
    f = fingerprint(REPO)
    assert f.python == platform.python_version()
    assert f.machine.cores > 0 and f.machine.cpu_model and f.machine.memory_gib > 0
    assert "pandas" in f.packages
    assert Machine.of(json.loads(f.to_json())) == f.machine


def test_git_fields_are_unknown_outside_a_checkout(tmp_path: Path) -> None:
    f = fingerprint(tmp_path)
    assert (f.git_commit, f.git_dirty) == (None, None)


def test_hardware_key_is_stable_and_names_the_gpus_or_their_absence() -> None:
    a, b = fingerprint(REPO), fingerprint(REPO)
    assert a.hardware_key() == b.hardware_key()
    names = ", ".join(g.name for g in a.machine.gpus) or "no GPU"
    assert a.hardware_key().endswith(f"({a.machine.isa}); {names}")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A git checkout with one committed source file, bench/code.py."""
    git(tmp_path, "init", "-q")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "code.py").write_text("SPEED = 1\n")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "source")
    return tmp_path


def test_a_clean_checkout_is_not_dirty(checkout: Path) -> None:
    f = fingerprint(checkout)
    assert f.git_commit is not None and f.git_dirty is False


def test_results_written_inside_the_checkout_leave_it_clean(checkout: Path) -> None:
    # Even where nothing ignores them and git is told to list every untracked file.
    git(checkout, "config", "status.showUntrackedFiles", "all")
    for run_dir in ("results/pr/20260101-short_qa-abc123", "bench/20260101-short_qa-def456"):
        (checkout / run_dir).mkdir(parents=True)
        (checkout / run_dir / "runs.parquet").write_bytes(b"PAR1")
    assert fingerprint(checkout).git_dirty is False


def test_commits_behind_counts_the_candidates_commits_the_baseline_lacks(checkout: Path) -> None:
    first = git(checkout, "rev-parse", "HEAD").strip()
    for n in (2, 3):
        (checkout / "bench" / "code.py").write_text(f"SPEED = {n}\n")
        git(checkout, "commit", "-q", "-am", f"speed {n}")
    last = git(checkout, "rev-parse", "HEAD").strip()
    assert commits_behind(checkout, first, last) == 2
    assert commits_behind(checkout, last, first) == 0


def test_commits_behind_is_unknown_for_a_commit_the_checkout_lacks(checkout: Path) -> None:
    head = git(checkout, "rev-parse", "HEAD").strip()
    assert commits_behind(checkout, "0123456789abcdef0123456789abcdef01234567", head) is None
    assert commits_behind(checkout, None, head) is None


def test_a_changed_tracked_file_makes_the_checkout_dirty(checkout: Path) -> None:
    (checkout / "bench" / "code.py").write_text("SPEED = 2\n")
    assert fingerprint(checkout).git_dirty is True


def test_a_deleted_tracked_file_makes_the_checkout_dirty(checkout: Path) -> None:
    (checkout / "bench" / "code.py").unlink()
    assert fingerprint(checkout).git_dirty is True


def test_a_new_untracked_file_beside_the_source_makes_the_checkout_dirty(checkout: Path) -> None:
    (checkout / "bench" / "new_module.py").write_text("SPEED = 3\n")
    assert fingerprint(checkout).git_dirty is True


def test_an_ignored_file_beside_the_source_leaves_the_checkout_clean(checkout: Path) -> None:
    (checkout / ".gitignore").write_text("*.pyc\n")
    git(checkout, "add", ".gitignore")
    git(checkout, "commit", "-q", "-m", "ignore")
    (checkout / "bench" / "code.pyc").write_bytes(b"\0")
    assert fingerprint(checkout).git_dirty is False


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the project's git checkout")
def test_this_repository_tracks_no_results_and_ignores_where_the_harness_writes() -> None:
    assert git(REPO, "ls-files", "results", "reports").split() == [
        "reports/.gitkeep",
        "results/.gitkeep",
    ]
    written = [
        "results/runs/20260101-short_qa-abc123/runs.parquet",
        "results/baselines/main/manifest.json",
        "results/ab/20260101-000000/baseline/x/runs.parquet",
        "results/pr/20260101-short_qa-abc123/runs.parquet",
        "reports/pr/report.md",
    ]
    ignored = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", *written], capture_output=True, text=True
    )
    assert ignored.stdout.split() == written
