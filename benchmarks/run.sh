#!/usr/bin/env bash
# The main job: install fastgen (keeping the installed torch) and run every benchmark on the device present.
# Extra arguments go to `python -m fastgen.bench` (e.g. --quick, --op diffusion_step, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "torch==2.13.0"   # the CPU build; a GPU machine keeps its own torch
fi
# Build tools and optional extras; on a machine without a package registry these may already be there.
"$PY" -m pip install setuptools wheel ninja pybind11 numpy tqdm triton matplotlib \
  || echo "fastgen: could not install some optional packages; continuing with what is installed" >&2
MAX_JOBS=${MAX_JOBS:-4} "$PY" -m pip install --no-build-isolation --no-deps -e .
"$PY" -m fastgen.info
"$PY" -m fastgen.bench "$@"
