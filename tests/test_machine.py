"""The machine identity in the fingerprint: what it reads, and which differences matter."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace
from typing import Any

import pandas as pd

from bench import report
from bench.environment import Machine, cpu_of, gpus_of, version_differences, versions
from tests.synthetic import run_record

# /proc/cpuinfo of two 2-vCPU cloud VMs with the same "AMD EPYC" model name: Zen 3 (AVX2)
# and Zen 4 (AVX-512); abridged to the lines that matter, the flags kept whole.
EPYC_AVX2 = """\
processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ht syscall nx lm pni \
pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand hypervisor \
lahf_lm cmp_legacy abm sse4a misalignsse 3dnowprefetch bmi1 avx2 smep bmi2 erms rdseed adx \
smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr rdpid

processor	: 1
model name	: AMD EPYC
flags		: fpu vme de pse tsc avx2 fma
"""
EPYC_AVX512 = """\
processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ht syscall nx lm pni \
pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand hypervisor \
bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb \
avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 avx512_bf16 avx512vbmi umip pku \
avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm
"""
SAPPHIRE_RAPIDS = """\
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 \
avx512_fp16 avx_vnni amx_bf16 amx_tile amx_int8
"""
GRAVITON3 = """\
processor	: 0
BogoMIPS	: 2100.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs \
paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
"""


def _machine(cpuinfo: str = EPYC_AVX2, **fields: Any) -> Machine:
    model, isa, flags = cpu_of(cpuinfo)
    base = Machine(
        cpu_model=model,
        isa=isa,
        isa_flags=flags,
        cores=2,
        memory_gib=7.8,
        gpus=(),
        gpu_driver=None,
        cuda_driver=None,
    )
    return dataclasses.replace(base, **fields)


class FakeNvmlError(Exception):
    pass


def _nvml(name: str, memory_mib: int, power_mw: int | None = 700_000) -> SimpleNamespace:
    """An initialised pynvml module with one GPU; power_mw=None: the GPU does not report it."""

    def power(_: object) -> int:
        if power_mw is None:
            raise FakeNvmlError("Not Supported")
        return power_mw

    clocks = {1: 1980, 2: 2619}
    return SimpleNamespace(
        NVMLError=FakeNvmlError,
        NVML_CLOCK_SM=1,
        NVML_CLOCK_MEM=2,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"handle{i}",
        nvmlDeviceGetName=lambda _: name,
        nvmlDeviceGetMemoryInfo=lambda _: SimpleNamespace(total=memory_mib * 2**20),
        nvmlDeviceGetUUID=lambda h: f"GPU-{h}",
        nvmlDeviceGetPowerManagementLimit=power,
        nvmlDeviceGetApplicationsClock=lambda _, which: clocks[which],
        nvmlSystemGetDriverVersion=lambda: "550.54.15",
        nvmlSystemGetCudaDriverVersion=lambda: 12040,
    )


def _gpu_machine(nv: SimpleNamespace) -> Machine:
    gpus, driver, cuda = gpus_of(nv)  # type: ignore[arg-type]
    return _machine(gpus=tuple(gpus), gpu_driver=driver, cuda_driver=cuda)


def test_cpuinfo_tells_avx2_from_avx512_under_one_model_name() -> None:
    assert cpu_of(EPYC_AVX2) == ("AMD EPYC", "avx2", ("avx2", "fma", "f16c"))
    model, isa, flags = cpu_of(EPYC_AVX512)
    assert (model, isa) == ("AMD EPYC", "avx512")
    assert {"avx512f", "avx512_vnni", "avx512_bf16"} <= set(flags)
    assert _machine(EPYC_AVX2).differences(_machine(EPYC_AVX512)) == ["CPU ISA: avx2 vs avx512"]


def test_amx_is_the_isa_level_above_avx512_and_its_flags_are_listed() -> None:
    model, isa, flags = cpu_of(SAPPHIRE_RAPIDS)
    assert (model, isa) == ("Intel(R) Xeon(R) Platinum 8480+", "amx")
    assert {"amx_tile", "amx_bf16", "amx_int8", "avx512_fp16", "avx_vnni"} <= set(flags)


def test_arm_features_give_sve_or_neon() -> None:
    assert cpu_of(GRAVITON3)[1] == "sve"
    assert cpu_of("Features\t: fp asimd evtstrm\n")[1] == "neon"
    assert cpu_of("flags\t: fpu sse sse2\n")[1] == "basic"


def test_the_hardware_key_names_the_isa() -> None:
    assert _machine(EPYC_AVX512).key() == "AMD EPYC x2 (avx512); no GPU"


def test_one_isa_level_with_other_flags_is_another_machine() -> None:
    # e.g. a hypervisor that hides AVX-512 BF16 and VNNI from one VM of a Zen 4 host
    full = _machine(EPYC_AVX512)
    masked = dataclasses.replace(
        full, isa_flags=tuple(f for f in full.isa_flags if f not in ("avx512_bf16", "avx512_vnni"))
    )
    (difference,) = full.differences(masked)
    assert difference.startswith("CPU flags: ") and "avx512_bf16" in difference


def test_cores_and_memory_are_compared_with_memory_rounded() -> None:
    small = _machine(cores=2, memory_gib=7.8)
    assert small.differences(_machine(cores=4, memory_gib=15.6)) == [
        "cores: 2 vs 4",
        "memory: 7.8 vs 15.6 GiB",
    ]
    assert small.differences(_machine(cores=2, memory_gib=7.7)) == []


def test_nvml_tells_two_gpu_models_apart() -> None:
    h100 = _gpu_machine(_nvml("NVIDIA H100 80GB HBM3", 81_559))
    h200 = _gpu_machine(_nvml("NVIDIA H200", 143_771))
    assert h100.gpus[0].power_limit_w == 700.0
    assert (h100.gpus[0].sm_clock_mhz, h100.gpus[0].memory_clock_mhz) == (1980, 2619)
    assert (h100.gpu_driver, h100.cuda_driver) == ("550.54.15", "12.4")
    assert h100.differences(h200) == ["GPU 0: NVIDIA H100 80GB HBM3 vs NVIDIA H200"]
    assert h100.key() == "AMD EPYC x2 (avx2); NVIDIA H100 80GB HBM3"


def test_a_lower_power_limit_is_another_machine() -> None:
    full = _gpu_machine(_nvml("NVIDIA H100 80GB HBM3", 81_559, power_mw=700_000))
    capped = _gpu_machine(_nvml("NVIDIA H100 80GB HBM3", 81_559, power_mw=500_000))
    assert full.differences(capped) == ["GPU 0 power limit: 700 vs 500 W"]


def test_a_query_the_gpu_does_not_support_leaves_its_field_unknown() -> None:
    machine = _gpu_machine(_nvml("Tesla T4", 15_360, power_mw=None))
    assert machine.gpus[0].power_limit_w is None
    assert machine.gpus[0].sm_clock_mhz == 1980  # the other queries still answered


def test_another_gpu_count_is_another_machine() -> None:
    one = _gpu_machine(_nvml("NVIDIA H100 80GB HBM3", 81_559))
    two = dataclasses.replace(one, gpus=(*one.gpus, dataclasses.replace(one.gpus[0], index=1)))
    assert one.differences(two) == ["GPUs: 1 vs 2"]


def test_another_board_or_driver_of_one_model_is_the_same_machine() -> None:
    a = _gpu_machine(_nvml("NVIDIA H100 80GB HBM3", 81_559))
    gpu = dataclasses.replace(a.gpus[0], uuid_hash="another-board")
    b = dataclasses.replace(a, gpus=(gpu,), gpu_driver="560.35.03", cuda_driver="12.6")
    assert a.differences(b) == []


def test_the_machine_reads_back_from_its_json_and_is_absent_in_older_records() -> None:
    machine = _gpu_machine(_nvml("NVIDIA H100 80GB HBM3", 81_559))
    stored = json.loads(json.dumps({"machine": dataclasses.asdict(machine)}))
    assert Machine.of(stored) == machine
    older = {"cpu_model": "AMD EPYC", "cpu_count": 2, "gpus": [], "gpu_driver": None}
    assert Machine.of(older) is None


def test_driver_cuda_and_package_versions_are_listed_where_they_differ() -> None:
    a = {"python": "3.12.3", "packages": {"torch": "2.5.1+cpu", "numpy": "2.1.0"}}
    b = {
        "python": "3.12.3",
        "packages": {"torch": "2.6.0+cu124", "numpy": "2.1.0"},
        "machine": {"gpu_driver": "550.54.15", "cuda_driver": "12.4"},
    }
    assert version_differences(versions(a), versions(b)) == [
        "CUDA driver absent vs 12.4",
        "GPU driver absent vs 550.54.15",
        "torch 2.5.1+cpu vs 2.6.0+cu124",
    ]


def test_the_versions_of_several_runs_are_joined_where_they_differ() -> None:
    runs = [{"packages": {"torch": v, "numpy": "2.1.0"}} for v in ("2.6.0", "2.5.1")]
    assert versions(*runs) == {"torch": "2.5.1 / 2.6.0", "numpy": "2.1.0"}


def test_a_one_build_report_names_its_machine_and_software_versions() -> None:
    machine = _machine(EPYC_AVX512)
    env = {"python": "3.12.3", "packages": {"torch": "2.5.1+cpu", "numpy": "2.1.0"}}
    env["machine"] = dataclasses.asdict(machine)
    runs = pd.DataFrame(
        [vars(run_record(environment_json=json.dumps(env), hardware_key=machine.key()))]
    )
    items = report._environment(runs, ["r"]).items
    assert "machine: AMD EPYC x2 (avx512); no GPU" in items
    assert "software: Python 3.12.3, torch 2.5.1+cpu" in items
