from __future__ import annotations

import http.server
import socketserver
import subprocess
import sys
import threading
import time
from types import ModuleType, SimpleNamespace
from typing import cast

from bench.telemetry import Sample, Sampler, _sample, nvml, peaks, scrape_server


def test_sampler_records_the_peak_rss_of_a_process_tree() -> None:
    # The child allocates 80 MB in a grandchild, so the tree (not just the pid) must be summed.
    code = "import subprocess,sys; subprocess.run([sys.executable,'-c','b=bytearray(80_000_000);import time;time.sleep(3)'])"  # noqa: E501
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        with Sampler(interval_s=0.05, pids=[proc.pid]) as sampler:
            time.sleep(2.0)
        result = sampler.peaks_since(0.0)
    finally:
        proc.kill()
    assert result["process.rss_mib"] > 76


def test_without_nvml_there_are_no_gpu_samples() -> None:
    with nvml() as nv:
        has_gpu = nv is not None and nv.nvmlDeviceGetCount() > 0
    with Sampler(interval_s=0.01) as sampler:
        time.sleep(0.05)
    gpu = [s for s in sampler.samples() if s.source.startswith("gpu")]
    assert bool(gpu) == has_gpu


def test_an_unsupported_gpu_query_loses_only_its_own_metric() -> None:
    # NVML on a MIG-enabled GPU answers memory but not utilisation.
    class NVMLError(Exception):
        pass

    def unsupported(_: object) -> None:
        raise NVMLError("Not Supported")

    nv = SimpleNamespace(
        NVMLError=NVMLError,
        nvmlDeviceGetMemoryInfo=lambda _: SimpleNamespace(used=3 * 2**20),
        nvmlDeviceGetUtilizationRates=unsupported,
    )
    rows = _sample(cast(ModuleType, nv), [object()], [])
    assert [(s.source, s.metric, s.value) for s in rows] == [("gpu0", "memory_used_mib", 3.0)]


def test_peaks_ignore_earlier_samples_but_keep_the_opening_value() -> None:
    # One process's RSS over time: 100 MiB at t=0, 40 at t=1, 60 at t=2.
    history = [Sample(t, "process", "rss_mib", v) for t, v in enumerate([100.0, 40.0, 60.0])]
    history.append(Sample(1.5, "gpu0", "gpu_util_pct", 99.0))  # not a memory metric
    assert peaks(history, since_s=1.5) == {"process.rss_mib": 60.0}  # the earlier 100 is ignored
    assert peaks(history, since_s=3.0) == {"process.rss_mib": 60.0}  # no sample: the opening one
    # The process held 100 MiB when a window from t=0.5 opened, so that is its peak.
    assert peaks(history, since_s=0.5) == {"process.rss_mib": 100.0}


def test_stop_is_prompt() -> None:
    sampler = Sampler(interval_s=5.0).start()
    started = time.monotonic()
    sampler.stop()
    assert time.monotonic() - started < 1.0


def test_server_metrics_are_scraped_with_vllm_names() -> None:
    body = (
        b"# TYPE vllm:num_requests_running gauge\n"
        b'vllm:num_requests_running{model_name="a"} 3.0\n'
        b'vllm:num_requests_running{model_name="b"} 1.0\n'
        b"# TYPE vllm:num_requests_waiting gauge\n"
        b'vllm:num_requests_waiting{model_name="a"} 7.0\n'
        b"# TYPE unrelated gauge\nunrelated 5.0\n"
    )

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with socketserver.TCPServer(("127.0.0.1", 0), Metrics) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}/metrics"
        scraped = {s.metric: s.value for s in scrape_server(url)}
        httpd.shutdown()
    assert scraped == {"vllm:num_requests_running": 4.0, "vllm:num_requests_waiting": 7.0}
    assert scrape_server("http://127.0.0.1:9/metrics") == []  # no server, no samples
