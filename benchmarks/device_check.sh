#!/usr/bin/env bash
# The one prepared GPU run (DESIGN.md section 7), deadline-driven: build the CUDA extension
# on the device, check every op x backend, time the attention / MLP / LoRA tables against
# their peers, run the GPU tests, the training-step table and the CUDA sanitizers, and
# write everything to OUTDIR. Meant for an H200 with the fixed image (torch 2.11 + CUDA 13,
# triton 3.6, nvcc 13, pybind11, ninja; no installs, no network, no /work/shared).
#
#   bash benchmarks/device_check.sh [--part 1|2] [--dry-run] [--plan] OUTDIR
#
# Deadline: the whole call ends within RECON_DEVICE_DEADLINE seconds (default 540, so one
# 600 s device call always returns; 180 for --part 2). The end time is fixed at start; each step, in priority
# order, gets min(its cap, time left - RECON_DEVICE_RESERVE (default 20 s, kept for the
# report)) through `timeout`. A step whose grant is under RECON_DEVICE_MIN_STEP (default
# 20 s) is not started and is recorded as "skipped-for-time"; the benchmarks also get the
# grant as --deadline-s (they stop starting cases and write what they have after every case).
#
# The gate step (benchmarks/sm90_gate.py) probes the sm_90a attention kernels under hard
# timeouts; one that hangs or fails is turned off (RECON_CUDA_ATTN_FWD/_BWD=sm80, in
# runs/device/gate.env, RECON_DEVICE_GATE) for every later step and for part 2.
# Order and caps (seconds): see STEPS below. --part 1 (default) runs them in order and
# records every step's status in runs/device/state.tsv (RECON_DEVICE_STATE; git-ignored, so
# kept on a warm machine between calls) and
# OUTDIR/steps.csv. --part 2 (a second call) runs only the steps part 1 skipped for time
# (rebuilding the extension first if this machine does not have it); without a part-1
# record (RECON_DEVICE_STATE=FILE to name one) it runs every step from "tests" on.
# RECON_DEVICE_STEPS=a,b,... picks steps explicitly, RECON_DEVICE_CAPS=name=s,... changes caps.
#
# OUTDIR gets at most 6 files (the device tool returns 8): results.md (environment, step
# table, every table), results.csv (every benchmark row with GPU and versions), steps.csv,
# env.txt, logs.tar.gz (every log and per-bench csv/md), summary.txt; part 2 names them
# *_part2.*. They are rewritten after every step, so a call killed from outside still
# brings back what ran. The summary is printed last (the tool returns the output's tail).
#
# --dry-run: the same deadline machinery with CPU smoke commands (tiny --smoke benches,
# pytest collection, `recon check` on eager): tests the script without a GPU.
# --plan: print the steps and their caps and exit.
# (Tests only: RECON_DEVICE_STUB='shell code' replaces every step's command; $STEP names it.)
#
# On the lent H200 (15 min of device time in all, 10 per call, 1-2 to start):
#   call 1: bash benchmarks/device_check.sh $OUT                           (timeout_s 600)
#   call 2, at once while the machine is warm (its runs/ keeps part 1's record and build):
#           RECON_DEVICE_DEADLINE=180 bash benchmarks/device_check.sh --part 2 $OUT
#                                         (180: about what 900 s - start - call 1 leaves)
set -u -o pipefail

SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STEPS="build:120 gate:90 check:100 bench_attn:150 bench_mlp:60 bench_lora:45 launch:45 tests:150 bench_train:90 pad0:60 sanitize:120 tests_e2e:120 bench_hf:90 static:60"
PART2_FROM=tests # the first step a part 2 without a part-1 record runs

die() {
  echo "device_check.sh: $*" >&2
  exit 2
}
is_int() { case $1 in '' | *[!0-9]*) return 1 ;; esac }

# --------------------------------------------------------------------------- one step
# (re-invoked under `timeout` as: device_check.sh --_step NAME; environment from the parent)
run_step() {
  local name=$1
  : "${WORK:?--_step is internal: run benchmarks/device_check.sh OUTDIR}"
  cd "$ROOT" || exit 2
  # the gate's verdict (sm90_gate.py): the sm_90a kernels that hung or failed stay off
  # shellcheck disable=SC1090
  if [ "$name" != gate ] && [ -f "$GATE_ENV" ]; then . "$GATE_ENV"; fi
  if [ -n "${RECON_DEVICE_STUB:-}" ]; then
    STEP=$name exec bash -c "$RECON_DEVICE_STUB"
  fi
  local bench_args=(--out "$WORK" --deadline-s "$STEP_BUDGET")
  if [ "$DRY" = 1 ]; then bench_args+=(--smoke); else bench_args+=(--quick); fi
  case $name in
    build)
      if [ "$DRY" = 1 ]; then exec "$PY" -m recon_kernels info; fi
      # Hopper only (fast), in place into recon_kernels/ (build_cuda.py needs no setuptools)
      exec "$PY" build_cuda.py --archs 90a
      ;;
    gate)
      # the sm_90a attention kernels probed one by one under hard timeouts; a probe that
      # hangs or fails turns its kernel off (RECON_CUDA_ATTN_FWD/_BWD=sm80) for every later
      # step, so they still report the portable kernels and Triton (no GPU: "not applicable")
      exec "$PY" benchmarks/sm90_gate.py --env-file "$GATE_ENV" --probe-timeout 25
      ;;
    check)
      # every op x backend vs the float64 reference (+ the short GPU timing table);
      # autotuning off: one config per kernel, so the check does not compile every candidate
      if [ "$DRY" = 1 ]; then exec "$PY" -m recon_kernels check --no-timing; fi
      RECON_TRITON_AUTOTUNE=0 exec "$PY" -m recon_kernels check --all-dtypes
      ;;
    launch) exec "$PY" benchmarks/bench_launch.py "${bench_args[@]}" ;; # host cost per launch
    bench_attn) exec "$PY" benchmarks/bench_attention.py "${bench_args[@]}" ;;
    bench_mlp) exec "$PY" benchmarks/bench_mlp.py "${bench_args[@]}" ;;
    bench_lora) exec "$PY" benchmarks/bench_lora.py "${bench_args[@]}" ;;
    tests | tests_e2e)
      local files=(tests/test_cuda_emulator_hopper.py::test_hopper_selftest_on_gpu
        tests/test_cuda_emulator_hopper.py::test_flag_turns_on_gpu
        tests/test_attention.py tests/test_mlp.py tests/test_lora.py)
      [ "$name" = tests_e2e ] && files=(tests/test_models_blocks.py tests/test_models_gpt.py
        tests/test_models_bert.py tests/test_integrations_sdpa.py tests/test_integrations_peft.py)
      local f have=()
      for f in "${files[@]}"; do [ -f "${f%%::*}" ] && have+=("$f") || echo "not found (skipped): $f"; done
      [ ${#have[@]} -gt 0 ] || die "$name: none of ${files[*]} exists"
      files=("${have[@]}")
      if [ "$DRY" = 1 ]; then exec "$PY" -m pytest -q --co -p no:cacheprovider "${files[@]}"; fi
      # -v: one line per test, so a run cut by its timeout still says what passed; with
      # pytest-xdist (in the image) 8 workers share the GPU and compile kernels in parallel;
      # a worker whose CUDA context a fault killed restarts (tests/sticky_cuda.py)
      local par=()
      "$PY" -c "import xdist" >/dev/null 2>&1 && par=(-n 8 --max-worker-restart 16)
      RECON_TRITON_AUTOTUNE=0 exec "$PY" -m pytest -v "${par[@]}" --maxfail=25 \
        -p no:cacheprovider "${files[@]}" -k cuda --durations=10
      ;;
    pad0)
      # the triton 3.6 atomic-backward fault (head dim below its block, 2+ query blocks)
      # without its workaround, RECON_ATTN_BWD_PAD_D=0: does it still fault? (-x: a fault
      # is sticky, the first failure is the answer; its own process)
      local k="triton and (130x130x72 or 37x45x40)"
      if [ "$DRY" = 1 ]; then exec "$PY" -m pytest -q --co -p no:cacheprovider tests/test_attention.py -k "$k"; fi
      RECON_ATTN_BWD_PAD_D=0 RECON_TRITON_AUTOTUNE=0 exec "$PY" -m pytest -v -x -p no:cacheprovider \
        tests/test_attention.py -k "$k"
      ;;
    bench_train)
      local dev=(--quick)
      [ "$DRY" = 1 ] && dev=(--quick --device cpu --models gpt)
      exec "$PY" benchmarks/bench_train.py --out "$WORK" "${dev[@]}" --time-budget "$STEP_BUDGET"
      ;;
    sanitize)
      RECON_SANITIZE_BUDGET=$STEP_BUDGET PYTHON=$PY exec bash benchmarks/sanitize_cuda.sh "$WORK/sanitize"
      ;;
    bench_hf) exec "$PY" benchmarks/bench_hf.py --out "$WORK" --quick ;; # no GPU: says so, exits 0
    static)
      local lim=()
      [ "$DRY" = 1 ] && lim=(--limit 1)
      exec env -u TRITON_INTERPRET "$PY" benchmarks/triton_static.py --out "$WORK" \
        --filter "bf16 D=128" "${lim[@]}"
      ;;
    *) die "--_step: unknown step '$name' (expected one of: $(for s in $STEPS; do printf '%s ' "${s%%:*}"; done))" ;;
  esac
}

if [ "${1:-}" = --_step ]; then
  run_step "${2:?}"
  exit $?
fi

# --------------------------------------------------------------------------- arguments
PART=1 DRY=0 PLAN=0 OUT=""
while [ $# -gt 0 ]; do
  case $1 in
    --part) PART=${2:-}; shift 2 || die "--part: expected 1 or 2, got nothing" ;;
    --part=*) PART=${1#*=}; shift ;;
    --dry-run) DRY=1; shift ;;
    --plan) PLAN=1; shift ;;
    -h | --help) sed -n '2,/^set -u/p' "$SELF" | sed '$d'; exit 0 ;;
    -*) die "unknown option '$1' (expected --part 1|2, --dry-run, --plan, OUTDIR)" ;;
    *) [ -z "$OUT" ] || die "expected one OUTDIR, got '$OUT' and '$1'"; OUT=$1; shift ;;
  esac
done
[ -n "$OUT" ] || [ "$PLAN" = 1 ] || die "usage: benchmarks/device_check.sh [--part 1|2] [--dry-run] [--plan] OUTDIR"
case $PART in 1 | 2) ;; *) die "--part: expected 1 or 2, got '$PART'" ;; esac
# part 2 default: about what 900 s of device time leaves after a start and a 540 s part 1
DEADLINE=${RECON_DEVICE_DEADLINE:-$([ "$PART" = 2 ] && echo 180 || echo 540)}
RESERVE=${RECON_DEVICE_RESERVE:-20}
MIN_STEP=${RECON_DEVICE_MIN_STEP:-20}
for v in DEADLINE RESERVE MIN_STEP; do
  is_int "${!v}" || die "RECON_DEVICE_$v: expected whole seconds, got '${!v}'"
done
END=$((SECONDS + DEADLINE))

declare -A CAP
ORDER=()
for s in $STEPS; do
  ORDER+=("${s%%:*}")
  CAP[${s%%:*}]=${s##*:}
done
IFS=, read -r -a over <<<"${RECON_DEVICE_CAPS:-}"
for kv in "${over[@]}"; do
  k=${kv%%=*} val=${kv#*=}
  [ -n "${CAP[$k]:-}" ] || die "RECON_DEVICE_CAPS: unknown step '$k' (expected one of: ${ORDER[*]})"
  is_int "$val" || die "RECON_DEVICE_CAPS: $k: expected whole seconds, got '$val'"
  CAP[$k]=$val
done

if [ "$PLAN" = 1 ]; then
  echo "device_check plan (deadline ${DEADLINE}s, reserve ${RESERVE}s, min step ${MIN_STEP}s):"
  t=0
  for n in "${ORDER[@]}"; do
    t=$((t + CAP[$n]))
    fits=$([ $t -le $((DEADLINE - RESERVE)) ] && echo "fits even at full caps" || echo "runs if earlier steps finish early")
    printf '  %-12s cap %4ss  (cumulative %4ss: %s)\n' "$n" "${CAP[$n]}" "$t" "$fits"
  done
  exit 0
fi

mkdir -p "$OUT" || die "cannot create OUTDIR '$OUT'"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 2
TAG=$([ "$PART" = 2 ] && echo _part2 || true)
# runs/ is git-ignored: on a warm machine it survives between calls (part 2 reads part 1's)
WORK=${RECON_DEVICE_WORK:-$ROOT/runs/device/part$PART}
STATE=${RECON_DEVICE_STATE:-$ROOT/runs/device/state.tsv}
# the gate's exports, beside the state: part 2 keeps part 1's verdict
GATE_ENV=${RECON_DEVICE_GATE:-$(dirname "$STATE")/gate.env}
if [ -d "$WORK" ] && [ ! -f "$WORK/steps.tsv" ] && [ -n "$(ls -A "$WORK")" ]; then
  die "RECON_DEVICE_WORK: expected an empty or earlier device_check folder, got '$WORK' (not cleared)"
fi
rm -rf "$WORK"
mkdir -p "$WORK" || die "cannot create the work folder '$WORK'"
STEPS_TSV=$WORK/steps.tsv
printf 'step\tstatus\tcap_s\tgranted_s\tused_s\tpart\n' >"$STEPS_TSV"

PY=${PYTHON:-$(command -v python3 || command -v python)} # the image's python3 holds torch
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=1
# nothing outside the machine can be reached: never let a library try (and wait on) the network
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1
unset TRITON_INTERPRET
export PY WORK DRY ROOT GATE_ENV

# the steps this part runs
declare -A TODO PREV
if [ "$PART" = 2 ] && [ -f "$STATE" ]; then
  while IFS=$'\t' read -r n st _; do [ "$n" = step ] || PREV[$n]=$st; done <"$STATE"
fi
if [ -n "${RECON_DEVICE_STEPS:-}" ]; then
  IFS=, read -r -a pick <<<"$RECON_DEVICE_STEPS"
  for n in "${pick[@]}"; do
    [ -n "${CAP[$n]:-}" ] || die "RECON_DEVICE_STEPS: unknown step '$n' (expected one of: ${ORDER[*]})"
    TODO[$n]=1
  done
elif [ "$PART" = 1 ]; then
  for n in "${ORDER[@]}"; do TODO[$n]=1; done
elif [ -f "$STATE" ]; then
  echo "part 2: the steps part 1 skipped for time, from $STATE"
  while IFS=$'\t' read -r n st _; do
    case $st in skipped-for-time*) TODO[$n]=1 ;; esac
  done <"$STATE"
else
  echo "part 2: no part-1 record at $STATE: running every step from '$PART2_FROM' on"
  on=0
  for n in "${ORDER[@]}"; do
    [ "$n" = "$PART2_FROM" ] && on=1
    [ $on = 1 ] && TODO[$n]=1
  done
fi
if [ "$PART" = 2 ] && [ ${#TODO[@]} -gt 0 ] && [ -z "${TODO[build]:-}" ] && [ "$DRY" = 0 ] &&
  [ -z "${RECON_DEVICE_STUB:-}" ]; then
  # a fresh machine has no extension (the build is not carried): rebuild before the rest
  "$PY" -c "import recon_kernels._cuda" >/dev/null 2>&1 || TODO[build]=1
  # ... and, having lost part 1's verdict with it, probe the sm_90a kernels again
  [ -n "${TODO[build]:-}" ] && TODO[gate]=1
fi
if [ "$PART" = 1 ]; then rm -f "$GATE_ENV"; fi # a part 1 starts without an earlier verdict

record() { # name status cap granted used
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$PART" >>"$STEPS_TSV"
  printf '%-12s %-34s cap %4ss granted %4ss used %4ss\n' "$1" "$2" "$3" "$4" "$5"
}

step() { # NAME: run under min(cap, left - reserve), or record why not
  local name=$1 cap=${CAP[$1]}
  if [ -z "${TODO[$name]:-}" ]; then
    record "$name" "${PREV[$name]:+part 1: }${PREV[$name]:-not selected}" "$cap" 0 0
    return 0
  fi
  local left=$((END - SECONDS - RESERVE))
  local grant=$((cap < left ? cap : left))
  if [ "$grant" -lt "$MIN_STEP" ] || [ "$grant" -lt 1 ]; then
    record "$name" "skipped-for-time(left ${left}s)" "$cap" 0 0
    return 0
  fi
  # what a bench may spend starting cases: a quarter of the grant kept to finish the last one
  export STEP_BUDGET=$((grant - grant / 4))
  local t0=$SECONDS
  timeout -k 5 "$grant" bash "$SELF" --_step "$name" >"$WORK/$name.log" 2>&1
  local rc=$? status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status="TIMEOUT(${grant}s)"
  elif [ $rc -ne 0 ]; then
    status="FAILED(rc=$rc)"
  fi
  record "$name" "$status" "$cap" "$grant" $((SECONDS - t0))
  partial_report
}

partial_report() { # OUT files after every step: a call killed from outside still returns them
  timeout 10 "$PY" "$ROOT/benchmarks/device_report.py" --work "$WORK" --out "$OUT" --tag "$TAG" \
    --part "$PART" --deadline "$DEADLINE" --elapsed "$SECONDS (still running)" --quiet \
    >/dev/null 2>&1
  timeout 10 tar -czf "$OUT/logs$TAG.tar.gz" -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null
  return 0
}

echo "== device_check part $PART$([ "$DRY" = 1 ] && echo ' (dry run)'): deadline ${DEADLINE}s, reserve ${RESERVE}s, $(date -u +%FT%TZ)"
{
  date -u
  echo "part $PART; dry run $DRY; deadline ${DEADLINE}s"
  if [ "$DRY" = 0 ]; then
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  fi
  [ -n "${RECON_DEVICE_STUB:-}" ] && echo "stub run (tests): no version probe" ||
  timeout 60 "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, 'CUDA', torch.version.cuda, '| triton', triton.__version__, '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')" 2>&1
  command -v nvcc >/dev/null && nvcc --version 2>&1 | tail -1
} >"$WORK/env.txt" 2>&1
cat "$WORK/env.txt"

for n in "${ORDER[@]}"; do step "$n"; done
if [ "$PART" = 1 ]; then mkdir -p "$(dirname "$STATE")" && cp "$STEPS_TSV" "$STATE"; fi

# --------------------------------------------------------------------------- report
timeout $((RESERVE > 12 ? RESERVE - 8 : 4)) "$PY" "$ROOT/benchmarks/device_report.py" --work "$WORK" --out "$OUT" --tag "$TAG" \
  --part "$PART" --deadline "$DEADLINE" --elapsed "$SECONDS" >"$WORK/report.log" 2>&1 ||
  { echo "device_report.py failed:"; tail -20 "$WORK/report.log"; cp "$STEPS_TSV" "$OUT/steps$TAG.tsv"; }
timeout 10 tar -czf "$OUT/logs$TAG.tar.gz" -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null
cat "$WORK/report.log"
exit 0
