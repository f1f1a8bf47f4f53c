#!/usr/bin/env bash
# Installs fastgen and its test tools, then runs the linters and the test suite.
# On a fresh CPU machine this installs the CPU build of torch; where a torch is already installed
# (e.g. the GPU image's torch 2.11) it is kept, so no CUDA torch is ever pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "torch==2.13.0"
fi
"$PY" -m pip install setuptools wheel ninja pybind11 numpy tqdm triton pytest ruff scipy matplotlib transformers scikit-learn scikit-image hypothesis
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install --no-build-isolation --no-deps -e .
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m fastgen.info
"$PY" -m pytest -q -m "not slow" "$@"
