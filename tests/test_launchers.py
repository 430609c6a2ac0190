"""The sweep launchers in scenarios/hydra/launcher/: one job per machine.

slurm: a node of its own per job, taken exclusively. local_jobs: submitit's local executor, one
job at a time. ray_cluster: a Ray task per job that takes a whole node's CPUs (on a local Ray
of the sweep's own by default).
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import bench.schema  # noqa: F401  (registers the schema that scenarios/config.yaml starts from)
from bench import store
from bench.__main__ import check_command_line
from bench.config import SCENARIOS_DIR

# The Hydra plugin each launcher builds on: the `cluster` extra.
PLUGINS = {
    "slurm": "hydra_plugins.hydra_submitit_launcher",
    "local_jobs": "hydra_plugins.hydra_submitit_launcher",
    "ray_cluster": "hydra_plugins.hydra_ray_launcher",
}


def _hydra_config(launcher: str, *overrides: str) -> DictConfig:
    """The whole config, hydra.* included, that `python -m bench -m hydra/launcher=...` runs."""
    pytest.importorskip(PLUGINS[launcher], reason="launcher plugins are the `cluster` extra")
    with initialize_config_dir(config_dir=str(SCENARIOS_DIR), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[f"hydra/launcher={launcher}", *overrides],
            return_hydra_config=True,
        )


def _launcher(launcher: str, *overrides: str) -> dict[Any, Any]:
    """hydra.launcher as the launcher receives it: resolved, plain."""
    cfg = _hydra_config(launcher, *overrides)
    settings = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert isinstance(settings, dict)
    return settings


@pytest.mark.parametrize("launcher", sorted(PLUGINS))
def test_a_sweep_with_each_launcher_passes_the_command_line_check(launcher: str) -> None:
    pytest.importorskip(PLUGINS[launcher], reason="launcher plugins are the `cluster` extra")
    check_command_line(
        ["-m", f"hydra/launcher={launcher}", "scenario=short_qa,long_generation", "target=bundled"]
    )


def test_slurm_gives_each_job_one_exclusive_node() -> None:
    slurm = _launcher("slurm")
    assert slurm["_target_"].endswith("SlurmLauncher")
    assert slurm["nodes"] == 1 and slurm["tasks_per_node"] == 1
    assert slurm["additional_parameters"] == {"exclusive": True, "mem": 0}
    assert slurm["gpus_per_node"] is None  # the sweep's to choose
    assert slurm["max_num_timeout"] == 0


def test_slurm_settings_are_overridable() -> None:
    slurm = _launcher(
        "slurm", "hydra.launcher.cpus_per_task=64", "hydra.launcher.timeout_min=30",
        "hydra.launcher.gpus_per_node=8", "hydra.launcher.partition=gpu",
    )  # fmt: skip
    assert (slurm["cpus_per_task"], slurm["timeout_min"]) == (64, 30)
    assert (slurm["gpus_per_node"], slurm["partition"]) == (8, "gpu")


def test_slurm_batch_script_asks_for_a_whole_node(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The sbatch script the plugin would submit, rendered by submitit itself: only submitting
    (map_array) is replaced, and the check that srun exists on this machine."""
    submitit = pytest.importorskip("submitit")
    from submitit.slurm.slurm import SlurmExecutor

    executors: list[Any] = []

    def submit_nothing(executor: Any, *args: Any) -> list[Any]:
        executors.append(executor)
        return []  # no jobs, so the launcher has no results to wait for

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", submit_nothing)
    cfg = _hydra_config(
        "slurm", f"results_dir={tmp_path}", "hydra.launcher.gpus_per_node=2",
        "hydra.launcher.cpus_per_task=32",
    )  # fmt: skip
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    assert launcher.launch([["scenario=short_qa"]], initial_job_idx=0) == []
    (executor,) = executors
    script = executor._executor._make_submission_file_text("python -m bench", "0")
    flags = {line for line in script.splitlines() if line.startswith("#SBATCH")}
    assert {
        "#SBATCH --exclusive", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --mem=0", "#SBATCH --cpus-per-task=32", "#SBATCH --gpus-per-node=2",
        "#SBATCH --time=120",
    } <= flags  # fmt: skip


def test_local_jobs_has_submitit_locals_keys_and_a_lock_around_each_job(tmp_path: Path) -> None:
    pytest.importorskip(PLUGINS["local_jobs"])
    from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf

    local = _launcher("local_jobs", f"results_dir={tmp_path}")
    # Written out rather than inherited: the plugin's keys, plus setup, which its schema lacks.
    assert set(local) == set(OmegaConf.structured(LocalQueueConf)) | {"setup"}
    assert local["_target_"].endswith("LocalLauncher")
    assert local["nodes"] == 1 and local["tasks_per_node"] == 1
    sweep_dir = local["submitit_folder"].removesuffix("/.submitit/%j")
    assert sweep_dir.startswith(f"{tmp_path}/.multirun/")  # the sweep's, under results_dir
    assert local["setup"] == [f'exec 9>>"{sweep_dir}/.one_job_at_a_time.lock"', "flock 9"]


def test_ray_cluster_jobs_take_a_whole_node_of_a_local_ray_by_default() -> None:
    ray = _launcher("ray_cluster")["ray"]
    assert ray["init"]["address"] == "local"  # never a Ray someone else started here
    assert ray["init"]["_node_ip_address"] == "127.0.0.1"
    assert ray["init"]["include_dashboard"] is False
    # The local Ray has exactly one job's CPUs, so jobs run one after another.
    assert ray["init"]["num_cpus"] == ray["remote"]["num_cpus"]
    assert (ray["remote"]["max_calls"], ray["remote"]["max_retries"]) == (1, 0)
    bigger = _launcher("ray_cluster", "hydra.launcher.ray.remote.num_cpus=96")["ray"]
    assert bigger["init"]["num_cpus"] == bigger["remote"]["num_cpus"] == 96


def test_ray_cluster_overrides_for_a_running_cluster_leave_what_ray_refuses_unset() -> None:
    cfg = _hydra_config(
        "ray_cluster", "hydra.launcher.ray.init.address=auto",
        "hydra.launcher.ray.init.num_cpus=null", "hydra.launcher.ray.init._node_ip_address=null",
        "hydra.launcher.ray.remote.num_cpus=64",
    )  # fmt: skip
    init = cfg.hydra.launcher.ray.init
    # What the launcher does before ray.init: an object store size given when none is set,
    # which Ray refuses when joining a running cluster. The key is there, so it stays unset.
    init.setdefault("object_store_memory", 78643200)
    assert OmegaConf.to_container(init, resolve=True) == {
        "address": "auto", "_node_ip_address": None, "num_cpus": None,
        "include_dashboard": False, "object_store_memory": None,
    }  # fmt: skip


def _listening_addresses(root: psutil.Process) -> set[str]:
    found: set[str] = set()
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # ended between listing and asking
        found |= {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN}
    return found


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


@pytest.mark.slow
@pytest.mark.parametrize(
    ("launcher", "env"),
    [
        ("local_jobs", {}),
        # As the file's header says to run it: every Ray socket on 127.0.0.1.
        ("ray_cluster", {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}),
    ],
)
def test_a_two_job_sweep_runs_the_jobs_one_after_another_each_with_its_own_server(
    launcher: str, env: dict[str, str], tmp_path: Path
) -> None:
    pytest.importorskip(PLUGINS[launcher], reason="launcher plugins are the `cluster` extra")
    if launcher == "ray_cluster":
        pytest.importorskip("ray", reason="Ray is the `cluster` extra")
    results, cwd = tmp_path / "results", tmp_path / "cwd"
    cwd.mkdir()
    # From an empty directory, so that anything written outside results_dir would show there.
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "bench", "-m", f"hydra/launcher={launcher}",
            "target=refserver", "scenario=short_qa", "scenario.num_requests=4",
            "scenario.repeats=1", "scenario.warmup_requests=1", "scenario.concurrency=1,2",
            f"results_dir={results}", "progress=false",
        ],
        cwd=cwd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    listening: set[str] = set()
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        listening |= _listening_addresses(psutil.Process(proc.pid))
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output

    run_dirs = sorted(p for p in results.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(run_dirs) == 2, output
    runs = [store.load(d).runs for d in run_dirs]
    assert sorted(int(r["concurrency"].iloc[0]) for r in runs) == [1, 2]
    for r in runs:
        assert set(r["status"]) == {"complete"} and r["target_kind"].eq("refserver").all(), output
        assert r["load_time_s"].notna().all()  # the job started and timed a server of its own
    urls = [r["base_url"].iloc[0] for r in runs]
    assert len(set(urls)) == 2, urls
    spans = sorted(
        (pd.Timestamp(r["started_at"].min()), pd.Timestamp(r["ended_at"].max())) for r in runs
    )
    assert spans[0][1] <= spans[1][0], f"the jobs overlapped: {spans}"

    assert list(cwd.iterdir()) == []
    (sweep,) = (results / ".multirun").iterdir()
    if launcher == "local_jobs":
        assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 2  # each job's log
    assert listening and all(_loopback(ip) for ip in listening), listening
