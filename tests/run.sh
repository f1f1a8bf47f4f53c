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
"$PY" -m pip install setuptools wheel ninja pybind11 numpy tqdm safetensors pillow triton pytest ruff scipy matplotlib transformers scikit-learn scikit-image hypothesis diffusers
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install --no-build-isolation --no-deps -e .
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m fastgen.info
"$PY" -m pytest -q -m "not slow" "$@"
# Portability (DESIGN rule 12): the oracles and the C++ kernels again on the CPU paths other x86-64
# machines take, an AVX2-only machine and the SSE baseline, for ATen's kernels, MKL's BLAS, oneDNN and
# fastgen's own SIMD paths (each is capped at what this CPU runs). Inductor gets its own cache per pass:
# its cache keys do not include ATEN_CPU_CAPABILITY. Arguments given to this script select the tests of
# these passes too; FASTGEN_PORTABILITY=0 skips them.
if [ "${FASTGEN_PORTABILITY:-1}" != 0 ]; then
  targets=("$@")
  [ ${#targets[@]} -eq 0 ] && targets=(tests/ops tests/nn tests/metrics tests/diffusion tests/property)
  for pass in "avx2 AVX2 AVX2" "scalar SSE4_2 SSE41"; do
    read -r isa mkl onednn <<<"$pass"
    aten=$isa
    [ "$isa" = scalar ] && aten=default
    echo "portability pass: FASTGEN_CPU_ISA=$isa ATEN_CPU_CAPABILITY=$aten MKL_ENABLE_INSTRUCTIONS=$mkl ONEDNN_MAX_CPU_ISA=$onednn"
    cache=$(mktemp -d)
    FASTGEN_CPU_ISA=$isa ATEN_CPU_CAPABILITY=$aten MKL_ENABLE_INSTRUCTIONS=$mkl ONEDNN_MAX_CPU_ISA=$onednn \
      TORCHINDUCTOR_CACHE_DIR=$cache "$PY" -m pytest -q -m "not slow" -p no:cacheprovider "${targets[@]}"
    rm -rf "$cache"
  done
fi
