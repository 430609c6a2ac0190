#!/usr/bin/env bash
# The Python packages that the lent GPU machine's image lacks (it reaches no package registry),
# as wheels in .whl/ at the versions this checkout's venv runs. Run it here, then name .whl in
# the device call's carry; gpu_validation.sh installs them there.
#
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
# Only the harness's config stack: torch, triton, aiohttp, pandas, transformers and the rest
# are in the image (/work/.library/device/KINDS.md lists it).
packages=$($py - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("hydra-core", "omegaconf", "antlr4-python3-runtime")))
EOF
)
rm -rf .whl
# All three are pure Python (antlr4's runtime ships only an sdist): `pip wheel` builds them here.
$py -m pip wheel -q --no-deps -w .whl $packages
ls .whl
