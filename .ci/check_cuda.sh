#!/usr/bin/env bash
# Compile-check the CUDA build without a GPU (nothing is run):
#   1. every csrc/**/*.cu with nvcc for sm_80 and sm_90, as setup.py builds them (torch's COMMON_NVCC_FLAGS,
#      no --use_fast_math);
#   2. csrc/bindings.cpp with FASTGEN_WITH_CUDA defined (its CUDA entry points are otherwise never built
#      on a CPU-only machine), syntax only.
# Uses the installed torch's headers (the CPU wheel ships the c10/cuda and ATen/cuda headers) and one
# compiler process at a time. Fails on the first compile error.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v nvcc >/dev/null; then
  echo "check_cuda: nvcc not found" >&2
  exit 1
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "torch==2.13.0"
fi
mapfile -t INC < <("$PY" - <<'PY'
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths():
    print("-I" + p)
print("-I" + sysconfig.get_paths()["include"])
PY
)
# the flags torch's build adds to every nvcc call (no implicit half / bf16 conversions ...), as setup.py gets them
mapfile -t TORCH_NVCC < <("$PY" -c "from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as f; print(*f, sep='\n')")
DEFS=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -DFASTGEN_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -Icsrc)
# torch's own headers warn under -std=c++17 (bit-field initialisers); keep the rest of the warnings.
QUIET_TORCH=(-diag-suppress 3306 -Xcompiler -Wno-c++20-extensions)
mapfile -t SOURCES < <(find csrc -name '*.cu' | sort)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for src in "${SOURCES[@]}"; do
  for arch in 80 90; do
    echo "check_cuda: nvcc sm_${arch} ${src}"
    nvcc -c "$src" -o "$tmp/out.o" -std=c++17 -O2 --expt-relaxed-constexpr --threads 1 \
      -gencode "arch=compute_${arch},code=sm_${arch}" -Xcompiler -fPIC "${QUIET_TORCH[@]}" \
      "${TORCH_NVCC[@]}" "${DEFS[@]}" "${INC[@]}"
  done
done
CXX=${CXX:-c++}
echo "check_cuda: ${CXX} -fsyntax-only -DFASTGEN_WITH_CUDA csrc/bindings.cpp"
"$CXX" -fsyntax-only -std=c++17 -Wno-c++20-extensions "${DEFS[@]}" "${INC[@]}" csrc/bindings.cpp
echo "check_cuda: ${#SOURCES[@]} CUDA source(s) compile for sm_80 and sm_90; bindings.cpp compiles with CUDA"
