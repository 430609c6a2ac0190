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
    git_dirty: bool | None
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


def fingerprint(repo_dir: Path) -> Fingerprint:
    commit = _git(repo_dir, "rev-parse", "HEAD")
    status = _git(repo_dir, "status", "--porcelain", "--untracked-files=no")
    gpus, driver, cuda = _gpus()
    return Fingerprint(
        git_commit=commit,
        git_dirty=None if commit is None or status is None else bool(status),
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
