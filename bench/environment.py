"""The environment fingerprint recorded with every run, so comparability can be checked."""

from __future__ import annotations

import hashlib
import json
import platform
import socket
import subprocess
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import psutil

from bench.telemetry import nvml

PACKAGES = ("aiohttp", "hydra-core", "numpy", "pandas", "pyarrow", "scipy", "torch",
            "transformers", "nvidia-ml-py", "llm-serving-bench")  # fmt: skip


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total_mib: float
    uuid_hash: str


@dataclass(frozen=True)
class Fingerprint:
    git_commit: str | None
    git_dirty: bool | None  # the source differs from git_commit: see `source_changed`
    python: str
    platform: str
    hostname_hash: str
    cpu_model: str
    cpu_count: int
    memory_gib: float
    packages: dict[str, str]
    gpus: list[GpuInfo]
    gpu_driver: str | None
    cuda_driver_version: str | None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def hardware_key(self) -> str:
        """What must match for two runs' speeds to be comparable."""
        gpus = ", ".join(g.name for g in self.gpus) or "no GPU"
        return f"{self.cpu_model} x{self.cpu_count}; {gpus}"


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _git(repo: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _packages() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _gpus() -> tuple[list[GpuInfo], str | None, str | None]:
    with nvml() as nv:
        if nv is None:
            return [], None, None
        gpus = []
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            gpus.append(
                GpuInfo(
                    index=i,
                    name=str(nv.nvmlDeviceGetName(h)),
                    memory_total_mib=nv.nvmlDeviceGetMemoryInfo(h).total / 2**20,
                    uuid_hash=_short_hash(str(nv.nvmlDeviceGetUUID(h))),
                )
            )
        cuda = int(nv.nvmlSystemGetCudaDriverVersion())
        return gpus, str(nv.nvmlSystemGetDriverVersion()), f"{cuda // 1000}.{cuda % 1000 // 10}"


def source_changed(repo_dir: Path) -> bool | None:
    """Whether the checkout's source differs from its commit; None outside a git checkout.

    The source is what the commit would hold if the working tree were committed now: every
    tracked file (a change, staged or not, a deletion, a rename), and the untracked files that
    .gitignore does not exclude and that lie in a folder which already holds tracked files: a
    new module, scenario or architecture file that the code beside it can pick up.

    What the harness writes is not source. Its default folders (results/, reports/) are
    ignored, and wherever results_dir, baseline.dir or report= point inside the checkout, what
    it writes lands in a folder that holds no tracked file (a run's, a baseline's, a new report
    folder), which git lists as one untracked entry ending in "/"; such entries are skipped.
    Output written among tracked files (report= an existing source folder, or results
    committed to git) still counts.
    """
    # --untracked-files=normal: an untracked folder is one entry, whatever a user's
    # status.showUntrackedFiles says; -z: paths unquoted, entries NUL-terminated.
    status = _git(
        repo_dir, "--no-optional-locks", "status", "--porcelain", "-z", "--untracked-files=normal"
    )
    if status is None:
        return None
    # Only "?? " entries (untracked) are told apart from the rest (tracked changes), so the
    # leading space _git may strip from the first entry (" M path") does not matter.
    for entry in filter(None, status.split("\0")):
        if not entry.startswith("?? "):
            return True  # a tracked file changed (a rename's second path is never reached)
        if not entry.endswith("/"):
            return True  # an untracked file beside tracked ones
    return False


def fingerprint(repo_dir: Path) -> Fingerprint:
    commit = _git(repo_dir, "rev-parse", "HEAD")
    gpus, driver, cuda = _gpus()
    return Fingerprint(
        git_commit=commit,
        git_dirty=None if commit is None else source_changed(repo_dir),
        python=platform.python_version(),
        platform=platform.platform(),
        hostname_hash=_short_hash(socket.gethostname()),
        cpu_model=_cpu_model(),
        cpu_count=psutil.cpu_count() or 0,
        memory_gib=round(psutil.virtual_memory().total / 2**30, 1),
        packages=_packages(),
        gpus=gpus,
        gpu_driver=driver,
        cuda_driver_version=cuda,
    )
