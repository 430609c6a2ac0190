#!/usr/bin/env bash
# Every GPU check of the engine in one run, for a machine with a CUDA GPU and a CUDA build of
# torch (a session's lent H100/H200). Each step's output goes to $OUT (default reports/gpu/);
# the figures belong in docs/perf.md with this command.
#
#   bash benchmarks/gpu_validation.sh            # about 10 minutes on an H100
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-reports/gpu}
mkdir -p "$out"
py=${PYTHON:-python}

$py -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__,
torch.cuda.get_device_name())" | tee "$out/device.txt"
# 1. The kernels compiled (not interpreted) against the reference, CUDA graphs replayed against
#    eager steps, KV sizing and device selection on a real device.
echo "== tests"
$py -m pytest -q -p no:cacheprovider tests/runtime/test_triton_attention.py \
    tests/runtime/test_cuda_graphs.py tests/runtime/test_attention_backends.py \
    tests/runtime/test_device.py tests/runtime/test_attention_sinks_window.py \
    tests/runtime/test_moe_triton.py 2>&1 | tee "$out/tests.txt"
# 2. Batch-1 decode bandwidth against the copy bandwidth, Llama-3-8B shape, bf16 dummy weights,
#    with CUDA graphs and without (the goal: >= 75% of the copy bandwidth).
echo "== decode bandwidth"
$py benchmarks/decode_bandwidth.py --model llama-3-8b 2>&1 | tee "$out/decode_bandwidth.txt"
$py benchmarks/decode_bandwidth.py --model llama-3-8b --enforce-eager 2>&1 \
    | tee -a "$out/decode_bandwidth.txt"
# 3. Output tokens/s through the harness at 1, 8, 32 and 64 users (64 in / 128 out).
echo "== harness"
$py -m bench scenario=concurrency target=bundled target.model=llama-3-8b \
    runtime.load_format=dummy "scenario.concurrency=[1,8,32,64]" scenario.num_requests=128 \
    scenario.repeats=2 2>&1 | tee "$out/harness.txt"
# 4. The motivating model's shape: GPT-OSS-20B with dummy weights, batch-1 decode over its
#    active 3.6B parameters, experts through the fused Triton kernels
#    (runtime/layers/moe_triton.py) with CUDA graphs: held in MXFP4 as OpenAI ships them
#    (about 14 GB), then in bf16 (42 GB).
echo "== gpt-oss-20b"
$py benchmarks/decode_bandwidth.py --model gpt-oss-20b --tokens 64 --quantization mxfp4 2>&1 \
    | tee "$out/gpt_oss.txt"
$py benchmarks/decode_bandwidth.py --model gpt-oss-20b --tokens 64 2>&1 | tee -a "$out/gpt_oss.txt"
