from __future__ import annotations

import subprocess
import sys
import time

from bench.telemetry import Sample, Sampler, nvml


def test_sampler_records_the_peak_rss_of_a_process_tree() -> None:
    # The child allocates 80 MB in a grandchild, so the tree (not just the pid) must be summed.
    code = "import subprocess,sys; subprocess.run([sys.executable,'-c','b=bytearray(80_000_000);import time;time.sleep(3)'])"  # noqa: E501
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        with Sampler(interval_s=0.05, pids=[proc.pid]) as sampler:
            time.sleep(1.5)
        peaks = sampler.peaks_since(0)
    finally:
        proc.kill()
    assert peaks["process.rss_mib"] > 76


def test_without_nvml_there_are_no_gpu_samples() -> None:
    with nvml() as nv:
        has_gpu = nv is not None and nv.nvmlDeviceGetCount() > 0
    with Sampler(interval_s=0.01) as sampler:
        time.sleep(0.05)
    gpu = [s for s in sampler.samples() if s.source.startswith("gpu")]
    assert bool(gpu) == has_gpu


def test_peaks_since_a_mark_ignore_earlier_samples_but_keep_the_opening_value() -> None:
    sampler = Sampler(interval_s=0.01, pids=[])
    # A scripted history of one process's RSS: 100, 40 MiB, then (after mark 2) 60 MiB.
    sampler._samples.extend(Sample(t, "process", "rss_mib", v) for t, v in enumerate([100, 40, 60]))
    assert sampler.peaks_since(2) == {"process.rss_mib": 60.0}  # the earlier 100 is ignored
    assert sampler.peaks_since(3) == {"process.rss_mib": 60.0}  # empty window: the opening value
    # The process held 100 MiB when a window from mark 1 opened, so that is its peak.
    assert sampler.peaks_since(1) == {"process.rss_mib": 100.0}


def test_stop_is_prompt() -> None:
    sampler = Sampler(interval_s=5.0).start()
    started = time.monotonic()
    sampler.stop()
    assert time.monotonic() - started < 1.0
