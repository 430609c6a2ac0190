"""The environment fingerprint recorded with every run, so comparability can be checked.

Its `machine` says what a speed depends on: the CPU (model, vector ISA, logical cores), memory
and each GPU with its power limit and application clocks. Two runs' speeds compare only when
their machines have no `Machine.differences`; driver, CUDA and package versions may differ, and
`version_differences` lists them for a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from bench.telemetry import nvml

PACKAGES = ("aiohttp", "hydra-core", "numpy", "pandas", "pyarrow", "scipy", "torch",
            "transformers", "nvidia-ml-py", "llm-serving-bench")  # fmt: skip

# The /proc/cpuinfo flags that decide which kernels a CPU can run: the vector width (AVX2,
# AVX-512, Arm's NEON and SVE), and the dot-product and matrix units int8 and bfloat16 use.
ISA_FLAGS = tuple(
    "avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 avx512_fp16 avx_vnni "
    "amx_tile amx_bf16 amx_int8 asimd asimddp i8mm bf16 sve sve2".split()
)
# The ISA level: the first of these flags the CPU has names it (AMX comes with AVX-512).
ISA_LEVELS = {"amx_tile": "amx", "avx512f": "avx512", "avx2": "avx2", "sve": "sve", "asimd": "neon"}
# Memory sizes within this fraction are one machine's: the kernel reserves a little more or
# less from one boot to the next.
MEMORY_TOLERANCE = 0.05


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total_mib: float
    uuid_hash: str  # which board; not compared: another board of the same model is the same
    power_limit_w: float | None = None  # None where the GPU does not report it
    sm_clock_mhz: int | None = None  # application clocks, None where not reported
    memory_clock_mhz: int | None = None


@dataclass(frozen=True)
class Machine:
    """What a run's speed depends on, beyond the software: runs compare only on one machine."""

    cpu_model: str
    isa: str  # the widest vector ISA: amx, avx512, avx2, sve, neon, or "basic"
    isa_flags: tuple[str, ...]  # the ISA_FLAGS this CPU has
    cores: int  # logical CPUs this process may run on
    memory_gib: float
    gpus: tuple[GpuInfo, ...]
    gpu_driver: str | None  # versions: a difference is a warning, not a different machine
    cuda_driver: str | None

    def key(self) -> str:
        """A one-line summary for people: "AMD EPYC x2 (avx512); no GPU"."""
        gpus = ", ".join(g.name for g in self.gpus) or "no GPU"
        return f"{self.cpu_model} x{self.cores} ({self.isa}); {gpus}"

    def differences(self, other: Machine) -> list[str]:
        """What makes the two machines' speeds incomparable, in words ("cores: 2 vs 4"), this
        machine's value first; empty when they are one machine (drivers aside)."""
        found = []
        if self.cpu_model != other.cpu_model:
            found.append(f"CPU: {self.cpu_model} vs {other.cpu_model}")
        if self.isa != other.isa:
            found.append(f"CPU ISA: {self.isa} vs {other.isa}")
        elif self.isa_flags != other.isa_flags:
            found.append(f"CPU flags: {_flags(self.isa_flags)} vs {_flags(other.isa_flags)}")
        if self.cores != other.cores:
            found.append(f"cores: {self.cores} vs {other.cores}")
        larger = max(self.memory_gib, other.memory_gib)
        if abs(self.memory_gib - other.memory_gib) > MEMORY_TOLERANCE * larger:
            found.append(f"memory: {self.memory_gib:g} vs {other.memory_gib:g} GiB")
        if len(self.gpus) != len(other.gpus):
            found.append(f"GPUs: {len(self.gpus)} vs {len(other.gpus)}")
        for a, b in zip(self.gpus, other.gpus, strict=False):
            found += _gpu_differences(a, b)
        return found

    @classmethod
    def of(cls, environment: Mapping[str, Any]) -> Machine | None:
        """The machine in a run's environment_json (parsed); None for one recorded without it."""
        machine = environment.get("machine")
        if not isinstance(machine, dict):
            return None
        gpus = tuple(GpuInfo(**_known(GpuInfo, g)) for g in machine["gpus"])
        tuples = {"gpus": gpus, "isa_flags": tuple(machine["isa_flags"])}
        return cls(**(_known(cls, machine) | tuples))


def _known(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The values that are fields of dataclass `cls`: a later version may record more."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def _flags(flags: tuple[str, ...]) -> str:
    return " ".join(flags) or "none"


def _gpu_differences(a: GpuInfo, b: GpuInfo) -> list[str]:
    gpu = f"GPU {a.index}"
    if a.name != b.name:
        return [f"{gpu}: {a.name} vs {b.name}"]  # its memory, power and clocks differ too
    found = []
    if round(a.memory_total_mib) != round(b.memory_total_mib):
        found.append(f"{gpu} memory: {a.memory_total_mib:,.0f} vs {b.memory_total_mib:,.0f} MiB")
    if a.power_limit_w != b.power_limit_w:
        found.append(f"{gpu} power limit: {_value(a.power_limit_w)} vs {_value(b.power_limit_w)} W")
    clocks = {
        "SM": (a.sm_clock_mhz, b.sm_clock_mhz),
        "memory": (a.memory_clock_mhz, b.memory_clock_mhz),
    }
    for what, (x, y) in clocks.items():
        if x != y:
            found.append(f"{gpu} {what} application clock: {_value(x)} vs {_value(y)} MHz")
    return found


def _value(x: float | None) -> str:
    return "unknown" if x is None else f"{x:g}"


@dataclass(frozen=True)
class Fingerprint:
    git_commit: str | None
    git_dirty: bool | None  # the source differs from git_commit: see `source_changed`
    python: str
    platform: str
    hostname_hash: str
    packages: dict[str, str]
    machine: Machine

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def hardware_key(self) -> str:
        """The machine in one line, for people; `Machine.differences` decides comparability."""
        return self.machine.key()


def versions(*environments: Mapping[str, Any]) -> dict[str, str]:
    """The software versions in runs' environment_json (parsed): Python, the PACKAGES found,
    the GPU driver and CUDA driver, also of runs recorded before the machine identity; where
    the runs differ, their versions joined: "2.5.1+cpu / 2.6.0+cpu"."""
    found: dict[str, set[str]] = {}
    for environment in environments:
        machine = environment.get("machine") or environment  # older runs kept drivers on top
        named = {
            "Python": environment.get("python"),
            **environment.get("packages", {}),
            "GPU driver": machine.get("gpu_driver"),
            "CUDA driver": machine.get("cuda_driver", machine.get("cuda_driver_version")),
        }
        for name, version in named.items():
            if version is not None:
                found.setdefault(name, set()).add(str(version))
    return {name: " / ".join(sorted(v)) for name, v in found.items()}


def version_differences(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    """The versions that differ, in words ("torch 2.5.1+cpu vs 2.6.0+cu124"), a's first."""
    return [
        f"{name} {a.get(name, 'absent')} vs {b.get(name, 'absent')}"
        for name in sorted(set(a) | set(b), key=str.lower)
        if a.get(name) != b.get(name)
    ]


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


def cpu_of(cpuinfo: str) -> tuple[str, str, tuple[str, ...]]:
    """The CPU's model, ISA level and ISA_FLAGS, from the text of /proc/cpuinfo (its first
    processor: the kernel lists one entry per logical CPU, all alike)."""
    model, flags = "", set[str]()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # Features: Arm's name for them
            flags = set(value.split())
    isa = next((level for flag, level in ISA_LEVELS.items() if flag in flags), "basic")
    model = model or platform.processor() or platform.machine()
    return model, isa, tuple(f for f in ISA_FLAGS if f in flags)


def _packages() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def gpus_of(nv: ModuleType) -> tuple[list[GpuInfo], str | None, str | None]:
    """The GPUs that the initialised NVML module `nv` sees, its driver and CUDA driver version.

    Power limit and application clocks are optional in NVML: a GPU that does not support a
    query raises NVMLError for it, and that field stays None.
    """
    gpus = []
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        power = sm = mem = None
        with contextlib.suppress(nv.NVMLError):
            power = nv.nvmlDeviceGetPowerManagementLimit(h) / 1000  # mW
        with contextlib.suppress(nv.NVMLError):
            sm = int(nv.nvmlDeviceGetApplicationsClock(h, nv.NVML_CLOCK_SM))
        with contextlib.suppress(nv.NVMLError):
            mem = int(nv.nvmlDeviceGetApplicationsClock(h, nv.NVML_CLOCK_MEM))
        gpus.append(
            GpuInfo(
                index=i,
                name=str(nv.nvmlDeviceGetName(h)),
                memory_total_mib=nv.nvmlDeviceGetMemoryInfo(h).total / 2**20,
                uuid_hash=_short_hash(str(nv.nvmlDeviceGetUUID(h))),
                power_limit_w=power,
                sm_clock_mhz=sm,
                memory_clock_mhz=mem,
            )
        )
    driver = cuda = None
    with contextlib.suppress(nv.NVMLError):
        driver = str(nv.nvmlSystemGetDriverVersion())
    with contextlib.suppress(nv.NVMLError):
        version = int(nv.nvmlSystemGetCudaDriverVersion())
        cuda = f"{version // 1000}.{version % 1000 // 10}"
    return gpus, driver, cuda


def machine() -> Machine:
    """This machine. Reads /proc/cpuinfo rather than asking torch, whose import takes seconds."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model, isa, flags = cpu_of(cpuinfo)
    with nvml() as nv:
        gpus, driver, cuda = ([], None, None) if nv is None else gpus_of(nv)
    # The CPUs this process may use (a container's or taskset's share), as the engine counts.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Machine(
        cpu_model=model,
        isa=isa,
        isa_flags=flags,
        cores=cores or 0,
        memory_gib=round(psutil.virtual_memory().total / 2**30, 1),
        gpus=tuple(gpus),
        gpu_driver=driver,
        cuda_driver=cuda,
    )


def commits_behind(repo_dir: Path, base: str | None, candidate: str | None) -> int | None:
    """How many commits `candidate` has that `base` lacks (git rev-list --count BASE..CAND);
    None when either is unknown, or not a commit of the checkout at `repo_dir`."""
    if base is None or candidate is None:
        return None
    count = _git(repo_dir, "rev-list", "--count", f"{base}..{candidate}", "--")
    return int(count) if count and count.isdigit() else None


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
    return Fingerprint(
        git_commit=commit,
        git_dirty=None if commit is None else source_changed(repo_dir),
        python=platform.python_version(),
        platform=platform.platform(),
        hostname_hash=_short_hash(socket.gethostname()),
        packages=_packages(),
        machine=machine(),
    )
