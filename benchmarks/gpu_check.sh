#!/usr/bin/env bash
# One call on a GPU machine (the device tool): install against the machine's own torch/triton, run the
# GPU tests, run the benchmarks. Logs and results go to $OUT (default ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null || true
} >"$OUT/env.txt" 2>&1
MAX_JOBS=16 "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
"$PY" -m fastgen.info >"$OUT/info.txt" 2>&1
"$PY" -m pytest -q -x tests -p no:cacheprovider >"$OUT/tests.log" 2>&1
echo "tests rc=$?" >>"$OUT/tests.log"
"$PY" -m fastgen.bench --out "$OUT" "$@" >"$OUT/bench.txt" 2>&1
echo "bench rc=$?" >>"$OUT/bench.txt"
tail -5 "$OUT/tests.log"; cat "$OUT/bench.txt" | tail -60
