#!/usr/bin/env bash
# The GPU check: one command on a machine with a CUDA GPU, from any directory,
# no network (nothing is downloaded), under 8 minutes in all:
#   1. environment (GPU, torch, nvcc)
#   2. build the extension from source for the visible GPU only (its compute
#      capability, e.g. 9.0 on an H100/H200) and keep the ptxas report
#   3. the CUDA tests (tests/test_*cuda*.py and the device cases of the
#      hand-over, weight-rule and autograd tests)
#   4. koemorph-fused check --device cuda (fused against the reference)
#   5. the GPU benchmark table: fused vs eager vs torch.compile with the
#      fraction of a same-bytes device copy, then per-step time under
#      CUDA-graph replay (bench/graph_replay.py)
# and a one-screen summary, printed last and written to $OUT/gpu_summary.txt.
#
#   bash bench/gpu_check.sh              # OUT defaults to bench/results/gpu_check
#   OUT=/some/dir bash bench/gpu_check.sh
#   bash bench/gpu_check.sh --dry-run    # print the plan, run nothing (works without a GPU)
#
# Every step runs under a time limit within an overall budget
# (GPU_CHECK_BUDGET_S, default 450 s). A failed step is recorded and the next
# one runs, except that the steps needing the extension are skipped when the
# build failed (importing the package would start a slow just-in-time build).
# The exit code is the number of steps that failed or were skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
SUMMARY_FILE="$OUT/gpu_summary.txt"
PY=${PYTHON:-python}
is_toolkit() { [ -n "$1" ] && [ -x "$1/bin/nvcc" ] && [ -f "$1/include/cuda_runtime.h" ]; }
if ! is_toolkit "${CUDA_HOME:-}"; then
  unset CUDA_HOME
  if is_toolkit /usr/local/cuda; then
    export CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null 2>&1; then
    # `nvcc` may be a wrapper script; nvcc itself says where it lives.
    top=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
    top=$(readlink -f "${top:-$(dirname "$(readlink -f "$(command -v nvcc)")")/..}")
    if is_toolkit "$top"; then export CUDA_HOME=$top; fi
  fi
fi
# The visible GPU's architecture only (one ptxas pass per kernel, not four).
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export KOEMORPH_FUSED_WITH_CUDA=1
unset KOEMORPH_FUSED_CPU_ONLY
ARCH_TAG=sm_${TORCH_CUDA_ARCH_LIST//./}
ARCH_TAG=${ARCH_TAG%%+*}
ARCH_TAG=${ARCH_TAG%%;*}

BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$SECONDS
SUMMARY=()
FAILED=0

# step NAME MAX_SECONDS LOG COMMAND...: run COMMAND under a time limit, output
# shown and kept in $OUT/LOG; records OK / FAIL / TIMEOUT in the summary.
step() {
  local name=$1 max=$2 log=$3
  shift 3
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((max < left ? max : left))
  if [ "$DRY_RUN" = 1 ]; then
    SUMMARY+=("PLAN     $name (limit ${max}s): $*")
    return 0
  fi
  if [ "$limit" -lt 15 ]; then
    SUMMARY+=("SKIP     $name: time budget spent")
    FAILED=$((FAILED + 1))
    return 1
  fi
  echo
  echo "==== $name (limit ${limit}s, log $OUT/$log)"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$log"
  rc=$?
  local took=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then
    SUMMARY+=("OK       $name (${took}s)")
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    SUMMARY+=("TIMEOUT  $name: stopped after ${limit}s")
    FAILED=$((FAILED + 1))
  else
    SUMMARY+=("FAIL     $name: exit $rc after ${took}s")
    FAILED=$((FAILED + 1))
  fi
  return "$rc"
}

skip() {
  SUMMARY+=("SKIP     $1: $2")
  FAILED=$((FAILED + 1))
}

env_report() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
  echo "CUDA_HOME=${CUDA_HOME:-} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version | tail -n 2
}

build() {
  rm -f koemorph_fused/_C*.so  # never test a stale library
  "$PY" setup.py build_ext --inplace || return 1
  # A machine without a usable toolkit would quietly get a CPU-only build.
  "$PY" -c "import sys, koemorph_fused._ops as o; sys.exit(0 if o.library.with_cuda else 'the CUDA backend was not built: no toolkit found (set CUDA_HOME)')"
}

# ptxas registers and spills per kernel for the built architecture.
ptxas_report() {
  awk -v q="'" -v arch="$ARCH_TAG" -f .ci/ptxas_report.awk "$OUT/build.log"
}

# `timeout` runs programs, not shell functions: hand these to child shells.
export PY OUT ARCH_TAG
export -f env_report build ptxas_report

# Every tests/test_*cuda*.py, and the device cases of the files that run on both.
CUDA_TESTS=(tests/test_*cuda*.py tests/test_scale_in_place.py tests/test_weight_rule.py tests/test_autograd.py)

step "environment" 30 env.txt bash -c env_report

# Limits: build 200 + tests 180 + check 45 + benchmark 60 + replay 45 (+ 30
# environment, 15 ptxas) exceed the budget only when something is slow; the
# budget then cuts the last steps.
if step "build ($ARCH_TAG only)" "${GPU_CHECK_BUILD_S:-200}" build.log bash -c build; then
  step "ptxas report $ARCH_TAG (registers, no spills)" 15 ptxas.txt bash -c ptxas_report
  step "CUDA tests" 180 pytest_cuda.log \
    "$PY" -m pytest -q -ra --durations=10 -p no:cacheprovider "${CUDA_TESTS[@]}" -k cuda \
    --junitxml="$OUT/pytest_cuda.xml"
  step "koemorph-fused check --device cuda" 45 check.txt "$PY" -m koemorph_fused check --device cuda
  step "GPU benchmark (fused, eager, compile, copy)" 60 gpu_bench.txt \
    "$PY" -m koemorph_fused bench --device cuda --dtype float32,bfloat16 --mode fwdbwd \
    --batch 4,1048576 --providers fused,eager,compile --baselines copy --rounds 3 --min-time 0.02 \
    --no-progress --csv "$OUT/gpu_bench.csv" --json "$OUT/gpu_bench.json"
  step "CUDA-graph replay per step" 45 graph_replay.txt \
    "$PY" bench/graph_replay.py --batch 4,65536,1048576 --dtype float32,bfloat16 --out "$OUT/graph_replay_table.txt"
else
  for s in "ptxas report" "CUDA tests" "koemorph-fused check" "GPU benchmark" "CUDA-graph replay"; do
    skip "$s" "the build failed (see $OUT/build.log)"
  done
fi

# The one-screen summary: step results, then the key lines of each log.
last_lines() {  # last_lines FILE N PATTERN: the last N lines of FILE matching PATTERN
  [ -f "$1" ] && grep -E "$3" "$1" | tail -n "$2"
}
{
  if [ "$DRY_RUN" = 1 ]; then
    echo "==== gpu_check plan (dry run: nothing ran; budget ${BUDGET}s, arch $TORCH_CUDA_ARCH_LIST, OUT=$OUT)"
  else
    echo "==== gpu_check summary ($((SECONDS - START))s of ${BUDGET}s, arch $TORCH_CUDA_ARCH_LIST, logs in $OUT)"
  fi
  printf '%s\n' "${SUMMARY[@]}"
  if [ "$DRY_RUN" = 0 ]; then
    echo "-- environment";   last_lines "$OUT/env.txt" 3 "."
    echo "-- ptxas";         last_lines "$OUT/ptxas.txt" 4 "."
    echo "-- tests";         last_lines "$OUT/pytest_cuda.log" 6 "passed|failed|error|FAILED|ERROR"
    echo "-- check";         last_lines "$OUT/check.txt" 4 "."
    echo "-- benchmark";     last_lines "$OUT/gpu_bench.txt" 12 "."
    echo "-- graph replay";  last_lines "$OUT/graph_replay_table.txt" 10 "."
  fi
} > "$SUMMARY_FILE"
echo
cat "$SUMMARY_FILE"
echo "(written to $SUMMARY_FILE)"
exit "$FAILED"
