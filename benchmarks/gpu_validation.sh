#!/usr/bin/env bash
# Every GPU check of the engine in one run, for a machine with a CUDA GPU and a CUDA build of
# torch (written for an H100 or H200). Each step has its own time limit and the steps run
# highest priority first, so a run cut short still has the most important figures; each step
# writes its output to $OUT (default reports/gpu/) as it goes, and partial output is kept.
# `steps.txt` there has each step's seconds and exit status. The figures belong in
# docs/perf.md with this command.
#
#   bash benchmarks/gpu_wheels.sh       # where the venv is, if the GPU machine lacks hydra-core
#   bash benchmarks/gpu_validation.sh   # on the GPU machine, with .whl/ copied into the checkout
#
# The step limits add up to about 21 minutes; the whole run is expected to take about 7 on an
# H200 (an estimate: the script has not yet run on a GPU).
#
# LLAMA and MOE name the models (defaults llama-3-8b and gpt-oss-20b); LLAMA=small MOE=none
# runs the script's own plumbing on a CPU in a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-reports/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
llama=${LLAMA:-llama-3-8b}
moe=${MOE:-gpt-oss-20b}
export PYTHONUNBUFFERED=1

if [ -d .whl ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $py -c "import hydra, omegaconf" 2>/dev/null; then
    echo "hydra-core is missing: run benchmarks/gpu_wheels.sh where the venv is," \
        "then copy .whl/ into this checkout" >&2
    exit 1
fi

# step NAME SECONDS COMMAND...: run it under a time limit, its output to $out/NAME.txt
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "$name $((SECONDS - start))s rc=$rc" | tee -a "$out/steps.txt"
}

step device 60 $py -c "import torch, triton; print(torch.__version__, torch.version.cuda,
triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
    > "$out/nvidia-smi.txt" 2>&1

# 1. The kernels compiled (not interpreted) against the reference, CUDA graphs replayed against
#    eager steps, KV sizing, device selection and dummy weights on a real device. Each
#    constexpr combination is its own Triton compile: xdist spreads them over the cores.
parallel=()
$py -c "import xdist" 2>/dev/null && parallel=(-n 8)
step tests 300 $py -m pytest -q -p no:cacheprovider "${parallel[@]}" \
    tests/runtime/test_triton_attention.py tests/runtime/test_cuda_graphs.py \
    tests/runtime/test_attention_backends.py tests/runtime/test_device.py \
    tests/runtime/test_attention_sinks_window.py tests/runtime/test_moe_triton.py \
    "tests/runtime/test_tensor_parallel.py::test_dummy_shards_are_slices_of_the_single_process_model"

# 2. Batch-1 decode bandwidth against the copy bandwidth, Llama-3-8B shape, bf16 dummy weights,
#    with CUDA graphs (the goal: >= 75% of the copy bandwidth).
step decode_bandwidth 150 $py benchmarks/decode_bandwidth.py --model "$llama"

# 3. The motivating model's shape: GPT-OSS-20B with dummy weights, batch-1 decode over its
#    active 3.6B parameters, experts through the fused Triton kernels
#    (runtime/layers/moe_triton.py) with CUDA graphs, held in MXFP4 as OpenAI ships them.
if [ "$moe" != none ]; then
    step gpt_oss_mxfp4 180 $py benchmarks/decode_bandwidth.py --model "$moe" --tokens 64 \
        --quantization mxfp4
fi

# 4. Output tokens/s through the harness at 1, 8, 32 and 64 users (64 in / 128 out). 64
#    requests a level: 64 rounds of one user, one round of 64 (a minute or so at batch 1).
step harness 240 $py -m bench scenario=concurrency target=bundled "target.model=$llama" \
    runtime.load_format=dummy "scenario.concurrency=[1,8,32,64]" scenario.num_requests=64 \
    scenario.repeats=1 scenario.warmup_requests=4 "results_dir=$out/results"

# 5. What graphs and MXFP4 buy: the same decodes eagerly, and GPT-OSS in bf16 (42 GB).
step decode_bandwidth_eager 150 $py benchmarks/decode_bandwidth.py --model "$llama" \
    --enforce-eager
if [ "$moe" != none ]; then
    step gpt_oss_bf16 180 $py benchmarks/decode_bandwidth.py --model "$moe" --tokens 64
fi
cat "$out/steps.txt"
