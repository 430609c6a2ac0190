#!/usr/bin/env bash
# For a GPU machine that has torch but not the harness's config stack and cannot reach a
# package index: hydra-core and its dependencies as wheels in .whl/, at the versions this
# checkout's venv runs. Run it where the venv is, copy .whl/ into the checkout on the GPU
# machine; gpu_validation.sh installs them there.
#
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
# Only the harness's config stack: torch, triton, aiohttp, pandas, transformers and the rest
# are expected on the GPU machine already.
packages=$($py - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("hydra-core", "omegaconf", "antlr4-python3-runtime")))
EOF
)
rm -rf .whl
# All three are pure Python (antlr4's runtime ships only an sdist): `pip wheel` builds them here.
$py -m pip wheel -q --no-deps -w .whl $packages
ls .whl
