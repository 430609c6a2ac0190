from __future__ import annotations

import json
import platform
from pathlib import Path

from bench.environment import fingerprint

REPO = Path(__file__).resolve().parent.parent


def test_fingerprint_describes_this_machine() -> None:
    f = fingerprint(REPO)
    assert f.python == platform.python_version()
    assert f.cpu_count > 0 and f.cpu_model
    assert "pandas" in f.packages
    assert json.loads(f.to_json())["cpu_count"] == f.cpu_count


def test_git_fields_are_unknown_outside_a_checkout(tmp_path: Path) -> None:
    f = fingerprint(tmp_path)
    assert (f.git_commit, f.git_dirty) == (None, None)


def test_hardware_key_is_stable_and_names_the_gpus_or_their_absence() -> None:
    a, b = fingerprint(REPO), fingerprint(REPO)
    assert a.hardware_key() == b.hardware_key()
    names = ", ".join(g.name for g in a.gpus) or "no GPU"
    assert a.hardware_key().endswith(names)
