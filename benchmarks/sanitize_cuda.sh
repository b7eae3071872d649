#!/usr/bin/env bash
# compute-sanitizer over a small pass of every CUDA kernel (benchmarks/cuda_smoke.py):
#   memcheck   out-of-bounds / misaligned global and shared accesses, invalid launches
#   racecheck  shared-memory hazards between threads of a block (the --quick pass: slow tool)
#   synccheck  illegal __syncthreads / warp-collective use (divergent barriers)
# Logs go to OUTDIR (memcheck.log, racecheck.log, synccheck.log, each tool's smoke output
# in <tool>.out, and a summary.txt). Exit status: 0 clean, 1 an error was reported or the
# smoke pass failed; skips cleanly (exit 0, summary says why) without compute-sanitizer or
# without a GPU.
#
#   benchmarks/sanitize_cuda.sh OUTDIR        (PYTHON=... to pick the interpreter)
#
# RECON_SANITIZE_BUDGET=S (device_check.sh sets it): the three tools share S seconds, each
# under `timeout` (memcheck half, racecheck and synccheck a quarter each), so one slow tool
# cannot take the others' time and the summary is always written.
set -u -o pipefail
OUT=${1:?usage: benchmarks/sanitize_cuda.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

CS=$(command -v compute-sanitizer || true)
if [ -z "$CS" ]; then
  for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
    if [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ]; then CS="$d/bin/compute-sanitizer"; break; fi
  done
fi
if [ -z "$CS" ]; then
  echo "SKIPPED: compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda*)" | tee -a "$SUMMARY"
  exit 0
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "SKIPPED: no CUDA GPU visible to $PY" | tee -a "$SUMMARY"
  exit 0
fi
echo "compute-sanitizer: $CS ($("$CS" --version | tail -1))" | tee -a "$SUMMARY"

# One cudaMalloc per tensor: an access past a tensor's end is past its allocation (the
# caching allocator would hide it inside a bigger block).
export PYTORCH_NO_CUDA_MEMORY_CACHING=1

rc=0
BUDGET=${RECON_SANITIZE_BUDGET:-0}
case $BUDGET in '' | *[!0-9]*) echo "RECON_SANITIZE_BUDGET: expected whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
run_tool() {  # tool, share of the budget (1/N), smoke args...
  local tool=$1 share=$2
  shift 2
  local t0=$SECONDS lim=()
  [ "$BUDGET" -gt 0 ] && lim=(timeout -k 5 $((BUDGET / share > 5 ? BUDGET / share : 5)))
  "${lim[@]}" "$CS" --tool "$tool" --error-exitcode 86 --log-file "$OUT/$tool.log" \
    "$PY" benchmarks/cuda_smoke.py "$@" >"$OUT/$tool.out" 2>&1
  local status=$?
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "$tool: TIMEOUT (its share of RECON_SANITIZE_BUDGET=${BUDGET}s), $((SECONDS - t0)) s" | tee -a "$SUMMARY"
    rc=1
    return
  fi
  local errors
  errors=$(grep -aEo "(ERROR|RACECHECK) SUMMARY: .*" "$OUT/$tool.log" | tail -1)
  if [ "$status" -eq 0 ]; then
    echo "$tool: clean (${errors:-no summary}), $((SECONDS - t0)) s" | tee -a "$SUMMARY"
  elif [ "$status" -eq 86 ]; then
    echo "$tool: ERRORS REPORTED (${errors:-see log}), $((SECONDS - t0)) s: $OUT/$tool.log" | tee -a "$SUMMARY"
    rc=1
  else
    echo "$tool: smoke pass failed (exit $status), $((SECONDS - t0)) s: $OUT/$tool.out" | tee -a "$SUMMARY"
    tail -5 "$OUT/$tool.out" | sed 's/^/    /' | tee -a "$SUMMARY"
    rc=1
  fi
}

run_tool memcheck 2
run_tool racecheck 4 --quick
run_tool synccheck 4 --quick
exit $rc
