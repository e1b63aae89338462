#!/usr/bin/env bash
# benchmarks/gpu_check.sh OUTDIR [main|rest]      on the GPU machine (or DRY_RUN=cpu here)
# benchmarks/gpu_check.sh FETCHED record          back here, on what came back
#
# The first commands of a GPU session, sized for its 15 minutes of device time (benchmarks/NOTES.md,
# "The 15-minute GPU session"). Each phase runs under its own `timeout` and writes under OUTDIR as
# it goes; a failed or timed-out phase is recorded and the next one runs; each phase appends one
# line to OUTDIR/summary.txt (and prints it); the exit status is that of the first failure.
#
# main (at most 8.5 minutes; the limits below in seconds, times GPU_CHECK_TIME_SCALE):
#   a  load     30  the carried build loads and has its CUDA kernels (else it is built here:
#                   setup.py build_ext --inplace, BUILD_LIMIT s, not in the 8 minutes); device facts,
#                   nvidia-smi, measured copy bandwidth                     device.json, nvidia-smi.txt
#   count       30  dry run only: benchmarks/triton_count.py, the Triton specializations phases b, c
#                   and r3 compile on the GPU and whether they fit    triton_count.json
#   b  correct 150  benchmarks/gpu_correctness.py: both GPU backends against float64, one JSON line
#                   per check (110 s), then tests/test_cuda.py (40 s) but its 2**31 and inductor
#                   tests (the script has its own; call 2 runs the whole file)
#                                                       correctness.jsonl, tests-cuda-kernels.xml
#   c  bench   170  python -m fused_resnet.bench, bf16, eval and train-fwd+bwd, the ResNet-50 stage
#                   shapes, in chunks run while time is left: eager and the fused backends on every
#                   case first, then with torch.compile (inductor: seconds per case) on as many as
#                   fit, channels_last first          bench-c-N-NAME/results.json, goals-c.txt
#   d  model    90  ResNet-50 bf16 channels_last training step, batch 128: eager vs fused   model.json
#   e  overhead 60  python -m fused_resnet.bench --overhead --quick: host µs per module call, eager
#                   against the cuda and triton backends, eval / eval-grad / train-fwd /
#                   train-fwd+bwd, and the GPU activities (launches) of one call each
#                                                                     overhead/overhead.json
# rest (at most 4 minutes):
#   r1 tests   150  the whole tests/ suite on CUDA tensors (no -x)                 tests-cuda.xml
#   r2 sanitize 50  compute-sanitizer memcheck and racecheck over benchmarks/sanitize_cuda.py
#   r3 bench   rest fp16, then fp32 chunks of the op-level bench while time is left (bench-r3-*)
# record: merges FETCHED's bench chunks into benchmarks/results/<device-slug>.json and .png
#   (gpu_tools.py record; FETCHED is an OUTDIR or the folder holding gpu_check.tgz); commit both.
#
# The device returns at most 8 files from $OUT: with PACK=DIR the script tars OUTDIR into
# DIR/gpu_check.tgz after every phase (and copies summary.txt there), so a run cut off later still
# brings back every finished phase:
#   run(command="PACK=$OUT bash benchmarks/gpu_check.sh /tmp/gpu_check", timeout_s=540,
#       carry=["fused_resnet/_C.cpython-312-x86_64-linux-gnu.so"])
#
# DRY_RUN=cpu runs the same phases here: CPU tensors, the cpu backend in the role of "cuda", the
# Triton interpreter for "triton" (no bfloat16 there), tiny shapes, python = ${PYTHON:-python3}.
# tests/test_gpu_check.py runs it in CI.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR [main|rest] | FETCHED record}
MODE=${2:-main}
PY=${PYTHON:-python3}
case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac  # paths given are relative to the caller's directory
[[ -z ${PACK:-} || $PACK == /* ]] || PACK=$PWD/$PACK
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2  # the repository root
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [[ $MODE == record ]]; then
  exec $PY benchmarks/gpu_tools.py record "$OUT"
fi
case "${DRY_RUN:-}" in
  "") DEVICE=cuda; NATIVE=cuda ;;
  cpu)
    DEVICE=cpu; NATIVE=cpu
    export TRITON_INTERPRET=1  # before anything imports triton
    # One thread: on a shared 2-core VM OpenMP's spinning threads slow a step 2-10x (ResNet-18 at
    # 32x32: 0.35 s vs 4.6 s a step at load 7.5); the dry run's timings mean nothing anyway.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ;;
  *) echo "DRY_RUN must be cpu or unset" >&2; exit 2 ;;
esac
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
if [[ -n ${PACK:-} ]]; then
  mkdir -p "$PACK" && PACK=$(cd "$PACK" && pwd) || exit 2
  [[ $PACK != "$OUT" && $PACK != "$OUT"/* ]] || { echo "PACK must lie outside OUTDIR" >&2; exit 2; }
fi
# The dry run checks the script, not the GPU's times: on a shared 2-core machine (CI runs it beside
# another test worker) its phases take longer than on the GPU, so its limits are 4 times longer.
SCALE=${GPU_CHECK_TIME_SCALE:-$([[ -n ${DRY_RUN:-} ]] && echo 4 || echo 1)}
status=0

limit() { awk -v s="$SCALE" -v t="$1" 'BEGIN { printf "%d", s * t + 0.5 }'; }
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
join() { local IFS=';'; echo "$*"; }

# step NAME LIMIT CMD...: CMD under timeout, stdout+stderr to OUTDIR/NAME.log; sets STEP_RC and
# STEP_S. SIGINT first: pytest then still writes its junit xml, and Python prints where it was.
step() {
  local name=$1 seconds=$2
  shift 2
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$seconds" "$@" > "$OUT/$name.log" 2>&1
  STEP_RC=$?
  STEP_S=$((SECONDS - t0))
  return 0
}

# verdict PHASE RC SECONDS LIMIT DETAIL: the phase's summary line; the first failure sets the status.
verdict() {
  local phase=$1 rc=$2 seconds=$3 lim=$4 detail=$5 word=PASS
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    word="TIMEOUT (exit $rc)"
  elif [[ $rc -ne 0 ]]; then
    word="FAIL (exit $rc)"
  fi
  say "phase $phase: $word in ${seconds} s (limit ${lim} s): $detail"
  [[ $rc -ne 0 && $status -eq 0 ]] && status=$rc
  pack
}

pack() {
  [[ -n ${PACK:-} ]] || return 0
  tar czf "$PACK/gpu_check.tgz.part" -C "$(dirname "$OUT")" "$(basename "$OUT")" \
    && mv "$PACK/gpu_check.tgz.part" "$PACK/gpu_check.tgz"
  cp "$OUT/summary.txt" "$PACK/summary.txt"
}

json_field() {  # json_field FILE EXPR: a value of a JSON file (python, no torch)
  $PY -c "import json, sys; d = json.load(open(sys.argv[1])); print($2)" "$1" 2> /dev/null
}

phase_load() {
  local lim rc t0=$SECONDS
  lim=$(limit 30)
  if [[ $DEVICE == cuda ]]; then
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  else
    echo "dry run: no GPU, no nvidia-smi" > "$OUT/nvidia-smi.txt"
  fi
  step a-load "$lim" $PY benchmarks/gpu_tools.py facts --device "$DEVICE" --out "$OUT/device.json"
  rc=$STEP_RC
  if [[ $rc -eq 3 && $DEVICE == cuda ]]; then
    # The carried _C does not load or lacks CUDA kernels: build in place (site-packages untouched).
    step a-build "$(limit "${BUILD_LIMIT:-300}")" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
      $PY setup.py build_ext --inplace
    say "phase a: carried build did not load; setup.py build_ext --inplace: exit $STEP_RC in $STEP_S s (a-build.log)"
    step a-load "$lim" $PY benchmarks/gpu_tools.py facts --device "$DEVICE" --out "$OUT/device.json"
    rc=$STEP_RC
  fi
  verdict a-load "$rc" $((SECONDS - t0)) "$lim" \
    "$(json_field "$OUT/device.json" '"%s; %s; backends %s; copy %.0f GB/s" % (d["device_name"], d["extension_file"], d["backends"], d.get("copy_bandwidth_gbps", 0))')"
}

# Dry run only: the Triton specializations each phase of the GPU run compiles (JIT compiles are GPU
# time), counted on CPU tensors of the GPU run's shapes, and whether they fit the phases' limits.
phase_count() {
  local lim
  lim=$(limit 30)
  step count "$lim" $PY benchmarks/triton_count.py --out "$OUT/triton_count.json"
  verdict count "$STEP_RC" "$STEP_S" "$lim" "$(grep '^phase' "$OUT/count.log" | cut -d';' -f1 | paste -sd ';' -)"
}

phase_correctness() {
  local lim rc t0=$SECONDS detail
  lim=$(limit 150)
  # CORRECTNESS_ARGS, split on spaces (no inner quotes): e.g. CORRECTNESS_ARGS='--only ^(?!big/)'
  # drops the 2**31 checks when time is short.
  set -f
  # shellcheck disable=SC2086
  step b-correctness "$(limit 110)" $PY benchmarks/gpu_correctness.py --device "$DEVICE" --out "$OUT/correctness.jsonl" \
    ${CORRECTNESS_ARGS:-}
  set +f
  rc=$STEP_RC
  detail=$($PY - "$OUT/correctness.jsonl" << 'PYEOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
checks = [l for l in lines if l["check"] != "summary"]
count = lambda v: sum(1 for l in checks if l.get("passed") is v)
failed = [l["check"] for l in checks if l.get("passed") is False]
spec = [l.get("triton_specializations") for l in checks if l.get("triton_specializations") is not None]
print(f"{count(True)} passed, {count(False)} failed, {count(None)} skipped"
      + ("" if any(l["check"] == "summary" for l in lines) else " (cut off: no summary line)")
      + f"; Triton specializations {spec[-1] if spec else 'n/a'}"
      + (f"; failed: {', '.join(failed[:5])}" if failed else ""))
PYEOF
)
  if [[ $DEVICE == cuda ]]; then
    step b-tests-cuda "$(limit 40)" env FUSED_RESNET_TEST_DEVICE=cuda $PY -m pytest tests/test_cuda.py -q \
      -p no:cacheprovider -k "not more_than_2_31 and not torch_compile" --junitxml="$OUT/tests-cuda-kernels.xml"
    detail="$detail; tests/test_cuda.py: $(tail -n 1 "$OUT/b-tests-cuda.log") (exit $STEP_RC)"
    [[ $rc -eq 0 ]] && rc=$STEP_RC
  else
    detail="$detail; tests/test_cuda.py: skipped in the dry run (it needs CUDA tensors)"
  fi
  verdict b-correctness "$rc" $((SECONDS - t0)) "$lim" "$detail"
}

# bench_chunks PHASE LIMIT SPEC...: each SPEC "NAME|PROVIDERS|REQUIRED|BENCH ARGS", run in order
# while at least 15 s of the phase's limit is left, each under the time left. A chunk that is
# REQUIRED (yes) fails the phase if it fails or is cut off; the others are cut off by design when
# time runs out (keeping the rows of their finished cases: bench rewrites results.json after each).
bench_chunks() {
  local phase=$1 lim=$2 t0=$SECONDS rc=0 notes=() spec name providers required args left bw i=0
  shift 2
  bw=$(json_field "$OUT/device.json" 'd.get("copy_bandwidth_gbps") or ""')
  for spec in "$@"; do
    i=$((i + 1))
    IFS='|' read -r name providers required args <<< "$spec"
    left=$((lim - (SECONDS - t0)))
    if [[ $left -lt 15 ]]; then
      notes+=("$name not run (time)")
      [[ $required == yes && $rc -eq 0 ]] && rc=124
      continue
    fi
    set -f  # args is a word list whose regexes must not glob
    # shellcheck disable=SC2086
    step "$phase-$i-$name" "$left" $PY benchmarks/gpu_tools.py bench --providers "$providers" ${bw:+--bandwidth "$bw"} \
      -- --device "$DEVICE" --skip-models $args --output "$OUT/bench-$phase-$i-$name"
    set +f
    notes+=("$name exit $STEP_RC in $STEP_S s")
    if [[ $STEP_RC -ne 0 && ( $required == yes || ( $STEP_RC -ne 124 && $STEP_RC -ne 137 ) ) && $rc -eq 0 ]]; then
      rc=$STEP_RC
    fi
  done
  local results=()
  mapfile -t results < <(ls -d "$OUT"/bench-"$phase"-*/results.json 2> /dev/null)
  if [[ ${#results[@]} -gt 0 ]]; then
    $PY benchmarks/check_goals.py "${results[@]}" > "$OUT/goals-$phase.txt" 2>&1
    notes+=("goals-$phase.txt $(grep -m 1 '^total' "$OUT/goals-$phase.txt")")
  fi
  verdict "$phase-bench" "$rc" $((SECONDS - t0)) "$lim" "$(join "${notes[@]}")"
}

phase_bench() {
  local fused="eager,$NATIVE,triton" all="eager,compile,$NATIVE,triton" common="--dtype bf16 --ops bn_relu,bn_add_relu"
  local acts="--dtype bf16 --ops bn_silu,bn_add_silu,bn_relu6 --modes eval,train-fwd+bwd"
  if [[ $DEVICE == cuda ]]; then
    bench_chunks c "$(limit 170)" \
      "fused-eval|$fused|yes|$common --modes eval" \
      "fused-train|$fused|yes|$common --modes train-fwd+bwd" \
      "acts-cl|$all|no|$acts --cases channels_last" \
      "compile-eval-cl|$all|no|$common --modes eval --cases channels_last" \
      "compile-train-cl|$all|no|$common --modes train-fwd+bwd --cases channels_last" \
      "compile-eval-nc|$all|no|$common --modes eval --cases contiguous" \
      "compile-train-nc|$all|no|$common --modes train-fwd+bwd --cases contiguous"
  else
    # Dry run: bench's CPU quick shape (4x64x28x28), one case per chunk (the activations' chunk
    # left out: its plumbing is the other chunks'), the cpu backend only
    # (bench never times the Triton interpreter), no torch.compile (inductor's CPU C++ compile
    # takes 20-40 s a case here; on the GPU the same bench code runs it).
    bench_chunks c "$(limit 170)" \
      "fused-eval|$fused|yes|--dtype bf16 --ops bn_relu --quick --modes eval --cases channels_last" \
      "fused-train|$fused|yes|--dtype bf16 --ops bn_add_relu --quick --modes train-fwd+bwd --cases contiguous"
  fi
}

phase_model() {
  local lim args
  lim=$(limit 90)
  if [[ $DEVICE == cuda ]]; then
    args="--batch 128 --size 224 --dtype bf16"
  else
    # ResNet-18 in fp32: ResNet-50 (and bf16 convolutions) take seconds a step on this CPU.
    args="--model resnet18 --batch 2 --size 32 --dtype fp32 --rounds 1 --min-run-time 0.05"
  fi
  # shellcheck disable=SC2086
  step d-model "$lim" $PY benchmarks/gpu_tools.py model --device "$DEVICE" --out "$OUT/model.json" $args
  verdict d-model "$STEP_RC" "$STEP_S" "$lim" "$(grep '^resnet' "$OUT/d-model.log" | tr -s ' ' | paste -sd ';' -)"
}

phase_overhead() {
  local lim
  lim=$(limit 60)
  step e-overhead "$lim" $PY -m fused_resnet.bench --overhead --quick --device "$DEVICE" --output "$OUT/overhead"
  verdict e-overhead "$STEP_RC" "$STEP_S" "$lim" \
    "$(grep -E '^bn_(add_)?relu 2d' "$OUT/e-overhead.log" | tr -s ' ' | paste -sd ';' -)"
}

phase_tests() {
  local lim xdist="" tests="tests --ignore=tests/test_gpu_check.py"  # the dry run is CI's, on CPU
  lim=$(limit 150)
  if [[ $DEVICE == cuda ]]; then
    $PY -c "import xdist" 2> /dev/null && xdist="-n 8"  # 16 cores: compiles and host work overlap
  else
    tests=tests/test_backend.py  # dry run: the plumbing, not the CPU suite, and no xdist on 2 cores
  fi
  # FUSED_RESNET_FAILURES: each failure written as it happens (tests/conftest.py), so a run cut off
  # by its limit still names them (pytest's summary and junit xml come only at the end)
  # shellcheck disable=SC2086
  step r1-tests "$lim" env FUSED_RESNET_TEST_DEVICE="$DEVICE" FUSED_RESNET_FAILURES="$OUT/r1-failures.txt" \
    $PY -m pytest $tests -q -p no:cacheprovider $xdist \
    --durations=20 --junitxml="$OUT/tests-$DEVICE.xml"
  verdict r1-tests "$STEP_RC" "$STEP_S" "$lim" "$tests${xdist:+ ($xdist)}: $(grep -E '(passed|failed|error)' "$OUT/r1-tests.log" | tail -n 1)"
}

phase_sanitize() {
  local lim tool rc=0 t0=$SECONDS notes=()
  lim=$(limit 50)
  if [[ $DEVICE != cuda ]] || ! command -v compute-sanitizer > /dev/null; then
    verdict r2-sanitize 0 0 "$lim" "skipped: needs a GPU and compute-sanitizer"
    return
  fi
  for tool in memcheck racecheck; do
    step "r2-sanitize-$tool" $((lim / 2)) compute-sanitizer --tool "$tool" --error-exitcode 9 $PY benchmarks/sanitize_cuda.py
    notes+=("$tool exit $STEP_RC in $STEP_S s: $(tail -n 1 "$OUT/r2-sanitize-$tool.log")")
    [[ $STEP_RC -ne 0 && $rc -eq 0 ]] && rc=$STEP_RC
  done
  verdict r2-sanitize "$rc" $((SECONDS - t0)) "$lim" "$(join "${notes[@]}")"
}

phase_rest_bench() {
  local fused="eager,$NATIVE,triton" left
  left=$(($(limit 240) - SECONDS))  # what the 4 minutes leave after r1 and r2
  if [[ $DEVICE == cuda ]]; then
    bench_chunks r3 "$left" \
      "fp16-eval|$fused|no|--dtype fp16 --ops bn_relu,bn_add_relu --modes eval" \
      "fp16-train|$fused|no|--dtype fp16 --ops bn_relu,bn_add_relu --modes train-fwd+bwd" \
      "fp32-eval|$fused|no|--dtype fp32 --ops bn_relu,bn_add_relu --modes eval" \
      "fp32-train|$fused|no|--dtype fp32 --ops bn_relu,bn_add_relu --modes train-fwd+bwd"
  else
    bench_chunks r3 "$left" "fp16-eval|$fused|no|--dtype fp16 --ops bn_relu --quick --modes eval --cases channels_last"
  fi
}

say "== gpu_check.sh $MODE $(date -u +%FT%TZ) device=$DEVICE python=$PY scale=$SCALE ${DRY_RUN:+(dry run)}"
SECONDS=0
case "$MODE" in
  main) phase_load; [[ -n ${DRY_RUN:-} ]] && phase_count; phase_correctness; phase_bench; phase_model; phase_overhead ;;
  rest) phase_tests; phase_sanitize; phase_rest_bench ;;
  *) echo "unknown mode $MODE: main, rest or record" >&2; exit 2 ;;
esac
say "== done in $SECONDS s, status $status"
pack
exit $status
