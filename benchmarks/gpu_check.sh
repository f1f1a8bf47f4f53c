#!/usr/bin/env bash
# One device call on a GPU machine: install against the machine's own torch / triton, then run the GPU
# tests and / or benchmarks. Logs and results go to $OUT (default ./gpu_out).
#
#   bash benchmarks/gpu_check.sh                 # install + GPU tests + every benchmark (too long for one
#                                                #   10-minute device call: split it as below)
#   bash benchmarks/gpu_check.sh tests           # install + the GPU-marked tests (-m gpu) only
#   bash benchmarks/gpu_check.sh bench attention moe   # install + the benchmarks of these ops only
#
# Every benchmark op runs in its own process with its own time limit (BENCH_TIMEOUT, default 240 s), so
# one slow or failing op does not lose the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
MODE=${1:-all}
shift || true
OPS=("$@")
if [ ${#OPS[@]} -eq 0 ]; then
  OPS=(diffusion_step attention attention_decode moe_permute grouped_mm moe vq_nearest vq_ema ssim clip dalle glam glide)
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null || true
  date -u
} >"$OUT/env.txt" 2>&1
MAX_JOBS=16 "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
"$PY" -m fastgen.info >"$OUT/info.txt" 2>&1
if [ "$MODE" = all ] || [ "$MODE" = tests ]; then
  "$PY" -m pytest -q -m gpu tests -p no:cacheprovider -x --durations=20 >"$OUT/tests.log" 2>&1
  echo "tests rc=$?" >>"$OUT/tests.log"
  tail -30 "$OUT/tests.log"
fi
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  for op in "${OPS[@]}"; do
    timeout "${BENCH_TIMEOUT:-240}" "$PY" -m fastgen.bench --op "$op" --out "$OUT/bench_$op" >"$OUT/bench_$op.txt" 2>&1
    echo "bench $op rc=$?" | tee -a "$OUT/bench_$op.txt"
    tail -40 "$OUT/bench_$op.txt"
  done
fi
