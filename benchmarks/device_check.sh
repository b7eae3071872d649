#!/usr/bin/env bash
# The one prepared GPU run (DESIGN.md section 7): build the CUDA extension on the device,
# check every op x backend, run the GPU tests, the benchmark tables and the CUDA sanitizers,
# writing everything to OUTDIR. Meant for an H200 with the fixed environment (torch 2.11 +
# CUDA 13, triton 3.6, nvcc 13, pybind11, ninja; no installs) within ~8 minutes.
#
#   bash benchmarks/device_check.sh OUTDIR        (PYTHON=... to pick the interpreter)
#
# Steps run in priority order, each under its own timeout, so a slow step cannot starve the
# rest; the last lines printed are the summary (the device tool returns the output's tail).
set -u -o pipefail
OUT=${1:?usage: benchmarks/device_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the image's python3 holds torch
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET

step() {  # step NAME TIMEOUT_S CMD...: run, log to OUT/NAME.log, record status and time
  local name=$1 t=$2
  shift 2
  local t0=$SECONDS
  timeout "$t" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -eq 124 ] && status="TIMEOUT(${t}s)"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAILED(rc=$rc)"
  printf '%-14s %-16s %4ss\n' "$name" "$status" $((SECONDS - t0)) | tee -a "$SUMMARY"
  return 0
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, 'CUDA', torch.version.cuda, '| triton', triton.__version__)"
  nvcc --version 2>&1 | tail -1
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. the CUDA extension, built here for Hopper only (fast) into recon_kernels/ (without
#    setuptools: the image's may be too old for pyproject.toml's SPDX license field)
step build 240 "$PY" build_cuda.py --archs 90a
# 2. every op x backend vs the float64 reference, plus the short timing table
step check 180 "$PY" -m recon_kernels check --all-dtypes
# 3. the numerical tests on the GPU (Triton and CUDA kernels; autotuning off: one config per
#    kernel, the first that fits, so the test run does not compile every candidate)
step tests 300 env RECON_TRITON_AUTOTUNE=0 "$PY" -m pytest -q --maxfail=10 -p no:cacheprovider \
  tests/test_attention.py tests/test_mlp.py tests/test_lora.py -k "cuda" --durations=10
# 4. benchmark tables (autotuned), most important first
step bench_attn 300 "$PY" benchmarks/bench_attention.py --out "$OUT" --quick
step bench_mlp 150 "$PY" benchmarks/bench_mlp.py --out "$OUT" --quick
step bench_lora 120 "$PY" benchmarks/bench_lora.py --out "$OUT" --quick
[ -f benchmarks/bench_train.py ] && step bench_train 150 "$PY" benchmarks/bench_train.py --out "$OUT" --quick
[ -f benchmarks/bench_hf.py ] && step bench_hf 150 "$PY" benchmarks/bench_hf.py --out "$OUT" --quick
# 5. compute-sanitizer memcheck / racecheck / synccheck on a small pass of every CUDA kernel
step sanitize 240 bash benchmarks/sanitize_cuda.sh "$OUT/sanitize"
# 6. the cuda cases of the model and integration tests (end-to-end parity on the kernels)
step tests_e2e 150 env RECON_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_models_blocks.py tests/test_models_gpt.py tests/test_models_bert.py \
  tests/test_integrations_sdpa.py tests/test_integrations_peft.py -k "cuda"
# 7. registers/spills of the Triton attention kernels as compiled by this triton version
step static 180 "$PY" benchmarks/triton_static.py --out "$OUT" --filter "bf16 D=128"

echo
echo "== results in $OUT"
tail -n 3 "$OUT/check.log" 2>/dev/null
tail -n 3 "$OUT/tests.log" 2>/dev/null
for f in "$OUT"/bench_*.md; do [ -f "$f" ] && { echo "-- $(basename "$f")"; grep -E "recon|fused|kernels" "$f" | head -12; }; done
echo "== summary"
cat "$SUMMARY"
