#!/usr/bin/env bash
# GPU verification in short device windows. Installs against the machine's own torch / triton (no pins),
# builds fastgen._C for THIS GPU's architecture only, and writes everything under $OUT (default ./gpu_out):
# at most 4 files per stage (<stage>_summary.txt, env.txt, <stage>_logs.tar.gz, and the bench JSON archive),
# with a short summary table printed LAST.
#
#   bash benchmarks/gpu_check.sh smoke        # build (skipped when _C already has CUDA) + the gpu_smoke set:
#                                             #   every kernel family once, fwd+bwd, each dtype (~81 tests);
#                                             #   Triton checks run while the CUDA build runs
#   bash benchmarks/gpu_check.sh bench [op..] # the headline benchmarks (--headline), one process and time limit
#                                             #   per op (BENCH_TIMEOUT, 75 s) within BENCH_BUDGET (330 s) for all;
#                                             #   each op's table is in its log the moment it ends
#   bash benchmarks/gpu_check.sh full         # the whole GPU suite (-m gpu) with xdist; resumable: a second call
#                                             #   skips what already passed (FASTGEN_RESUME_FILE)
#
# Estimates for an H100 / H200 (16 cores) are in benchmarks/RESULTS.md ("GPU time budget").
# GPU_CHECK_NO_BUILD=1 skips the build; GPU_CHECK_ON_CPU=1 runs a stage on a CPU machine (tiny shapes, CPU
# stand-in backends: a dry run of the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
STAGE=${1:-smoke}
shift || true
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && [ "${GPU_CHECK_ON_CPU:-0}" != 1 ]; then
  echo "gpu_check: no CUDA device here (GPU_CHECK_ON_CPU=1 runs the same stages on the CPU stand-ins)" >&2
  exit 1
fi
LOGS=$(mktemp -d)
# One Triton cache for every stage and every xdist worker: a kernel compiled by `smoke` is not compiled again.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton_cache}
CORES=$(nproc)
T0=$(date +%s)

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null || true
  date -u
} >"$OUT/env.txt" 2>&1

has_cuda_ext() {
  "$PY" -c "import fastgen._C as C, sys; sys.exit(0 if C.has_cuda() else 1)" >/dev/null 2>&1
}

# pytest options the GPU image supports: xdist (-n) and pytest-timeout when installed.
PYTEST_OPTS=(-q -p no:cacheprovider -rfE)
if "$PY" -c "import xdist" 2>/dev/null; then PYTEST_OPTS+=(-n "${XDIST_WORKERS:-4}"); fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_OPTS+=(--timeout "${TEST_TIMEOUT:-180}"); fi

build() {
  if [ "${GPU_CHECK_NO_BUILD:-0}" = 1 ]; then
    echo "build: skipped (GPU_CHECK_NO_BUILD=1)" >"$LOGS/build.log"
    return 0
  fi
  if has_cuda_ext; then
    echo "build: skipped (fastgen._C already imports with CUDA)" >"$LOGS/build.log"
    return 0
  fi
  local arch
  arch=$("$PY" -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}.{m}')")
  echo "build: TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$CORES" >"$LOGS/build.log"
  TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$CORES "$PY" -m pip install --no-build-isolation --no-deps -e . \
    >>"$LOGS/build.log" 2>&1
}

finish() {
  local stage=$1
  "$PY" -m fastgen.info >"$LOGS/info.txt" 2>&1
  tar -czf "$OUT/${stage}_logs.tar.gz" -C "$LOGS" . 2>/dev/null
  rm -rf "$LOGS"
  echo "wall: $(($(date +%s) - T0)) s" >>"$OUT/${stage}_summary.txt"
  cat "$OUT/${stage}_summary.txt"
}

# Per kernel family: passed / failed / errors of a junit file (summary table printed last).
junit_table() {
  "$PY" - "$@" <<'PY'
import collections, re, sys, xml.etree.ElementTree as ET
rows = collections.defaultdict(lambda: [0, 0, 0])
for path in sys.argv[1:]:
    try:
        root = ET.parse(path).getroot()
    except Exception as e:
        print(f"  (no results in {path}: {type(e).__name__})")
        continue
    for case in root.iter("testcase"):
        fam = re.sub(r"^test_", "", case.get("name", "?").split("[")[0])
        kids = {child.tag for child in case}
        if "skipped" in kids:
            continue
        rows[fam][1 if "failure" in kids else 2 if "error" in kids else 0] += 1
print(f"  {'kernel family':<26}{'passed':>8}{'failed':>8}{'errors':>8}")
for fam, (p, f, e) in sorted(rows.items()):
    mark = "" if f == e == 0 else "   <-- FAIL"
    print(f"  {fam:<26}{p:>8}{f:>8}{e:>8}{mark}")
PY
}

case "$STAGE" in
smoke)
  # Triton checks need no extension: they run while the CUDA build runs (both write into $LOGS).
  build &
  BUILD_PID=$!
  "$PY" -m pytest "${PYTEST_OPTS[@]}" -m gpu_smoke -k "triton" tests/test_gpu_smoke.py \
    --junitxml="$LOGS/smoke_triton.xml" >"$LOGS/smoke_triton.log" 2>&1
  wait "$BUILD_PID"
  BUILD_RC=$?
  "$PY" -m pytest "${PYTEST_OPTS[@]}" -m gpu_smoke -k "not triton" tests/test_gpu_smoke.py \
    --junitxml="$LOGS/smoke_rest.xml" >"$LOGS/smoke_rest.log" 2>&1
  {
    echo "gpu_check smoke: $(head -2 "$OUT/env.txt" | tail -1)"
    if has_cuda_ext; then echo "  fastgen._C: with CUDA ($(head -1 "$LOGS/build.log"))"; else
      echo "  fastgen._C: NO CUDA EXTENSION (build rc=$BUILD_RC): the cuda-backend checks fail or run on stand-ins"
      tail -15 "$LOGS/build.log"
    fi
    grep -hE "^(FAILED|ERROR) " "$LOGS"/smoke_*.log | head -40
    junit_table "$LOGS/smoke_triton.xml" "$LOGS/smoke_rest.xml"
  } >"$OUT/smoke_summary.txt" 2>&1
  finish smoke
  ;;
bench)
  build
  OPS=("$@")
  if [ ${#OPS[@]} -eq 0 ]; then  # most important first: when the budget runs out, the tail is what is lost
    OPS=(attention attention_decode grouped_mm moe vq_nearest diffusion_step ssim moe_permute vq_ema diffusers
      adaptive_pool glide clip dalle glam)
  fi
  mkdir -p "$LOGS/json"
  : >"$OUT/bench_summary.txt"
  BUDGET=${BENCH_BUDGET:-330}  # seconds for the whole stage (one <= 6-minute device call)
  START=$SECONDS
  for op in "${OPS[@]}"; do
    left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 25 ]; then
      echo "  $(printf '%-16s' "$op") not run: the ${BUDGET}s budget is spent (BENCH_BUDGET)" >>"$OUT/bench_summary.txt"
      continue
    fi
    limit=${BENCH_TIMEOUT:-75}
    [ "$limit" -gt "$left" ] && limit=$left
    # --headline: 1-5 cases per op at full size, full timing budgets; the table and JSON of each op are
    # written the moment it ends, so a cut loses only the op in flight
    timeout "$limit" "$PY" -m fastgen.bench --headline --op "$op" --no-plot --out "$LOGS/json/$op" \
      >"$LOGS/bench_$op.txt" 2>&1
    rc=$?
    echo "  $(printf '%-16s' "$op") rc=$rc $((SECONDS - START))s $([ $rc = 124 ] && echo "(time limit ${limit}s: partial)")" \
      >>"$OUT/bench_summary.txt"
    tar -czf "$OUT/bench_json.tar.gz" -C "$LOGS" json  # rewritten after every op: nothing is lost on a cut
  done
  {
    echo "gpu_check bench: per-op logs (tables) are in bench_logs.tar.gz; JSON in bench_json.tar.gz"
    echo "op                 rows wrong errors faster slower  geomean  vs"
    for op in "${OPS[@]}"; do
      [ -f "$LOGS/bench_$op.txt" ] && grep -A1 -hE "^op +rows wrong" "$LOGS/bench_$op.txt" | grep -vE "^(op |--)"
    done
  } >>"$OUT/bench_summary.txt"
  finish bench
  ;;
full)
  build
  export FASTGEN_RESUME_FILE=${FASTGEN_RESUME_FILE:-$PWD/.gpu_full_passed.txt}
  "$PY" -m pytest "${PYTEST_OPTS[@]}" -m "gpu or gpu_smoke" tests --junitxml="$LOGS/full.xml" \
    >"$LOGS/full.log" 2>&1
  {
    echo "gpu_check full: $(wc -l <"$FASTGEN_RESUME_FILE") tests passed so far (resume file $FASTGEN_RESUME_FILE)"
    grep -hE "^(FAILED|ERROR) " "$LOGS/full.log" | head -40
    tail -1 "$LOGS/full.log"
    junit_table "$LOGS/full.xml"
  } >"$OUT/full_summary.txt" 2>&1
  finish full
  ;;
*)
  echo "usage: bash benchmarks/gpu_check.sh smoke | bench [op ...] | full" >&2
  exit 2
  ;;
esac
