#!/usr/bin/env bash
# The GPU check, in one go on a machine with a CUDA GPU (no network needed),
# from the repository root, in under 8 minutes:
#   1. environment (GPU, torch, nvcc)
#   2. build the extension from source for the local GPU only (sm_90 by default)
#      and keep the ptxas register/spill report
#   3. the CUDA tests (pytest -k cuda)
#   4. koemorph-fused info
#   5. the GPU benchmark table (fused vs eager vs torch.compile)
#
#   OUT=/some/dir bash bench/gpu_check.sh     # default OUT=bench/results/gpu_check
#
# Every step runs under a time limit and within an overall budget
# (GPU_CHECK_BUDGET_S, default 470 s; the build at most GPU_CHECK_BUILD_S,
# default 330 s). A failed step is recorded and the next one runs, except that
# the steps needing the extension are skipped when the build failed (importing
# the package would start a slow just-in-time build).
# Logs go to $OUT; the summary is printed last; the exit code is the number of
# steps that failed or were skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
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
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset KOEMORPH_FUSED_CPU_ONLY

BUDGET=${GPU_CHECK_BUDGET_S:-470}
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

# ptxas registers and spills per kernel for sm_90, from the build log.
ptxas_report() {
  awk -v q="'" -v arch=sm_90 -f .ci/ptxas_report.awk "$OUT/build.log"
}

# `timeout` runs programs, not shell functions: hand these to child shells.
export PY OUT
export -f env_report build ptxas_report

step "environment" 60 env.txt bash -c env_report

if step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)" "${GPU_CHECK_BUILD_S:-330}" build.log bash -c build; then
  step "ptxas report sm_90 (registers, no spills)" 15 ptxas_sm90.txt bash -c ptxas_report
  step "CUDA tests (pytest -k cuda)" 240 pytest_cuda.log \
    "$PY" -m pytest -q -ra --durations=15 -p no:cacheprovider tests -k cuda --junitxml="$OUT/pytest_cuda.xml"
  step "koemorph-fused info" 60 info.txt "$PY" -m koemorph_fused info
  step "GPU benchmark" 600 gpu_bench.txt \
    "$PY" -m koemorph_fused bench --device cuda --dtype float32,bfloat16 --mode fwdbwd \
    --batch 4,64,1024,16384,262144,1048576 --providers fused,eager,compile \
    --csv "$OUT/gpu_bench.csv" --json "$OUT/gpu_bench.json"
else
  for s in "ptxas report" "CUDA tests" "koemorph-fused info" "GPU benchmark"; do
    skip "$s" "the build failed (see $OUT/build.log)"
  done
fi

echo
echo "==== summary ($((SECONDS - START))s, logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
exit "$FAILED"
