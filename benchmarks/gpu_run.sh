#!/usr/bin/env bash
# benchmarks/gpu_run.sh OUTDIR [build|test|bench|sanitize|all|record]...
#
# Everything a GPU session must do, in as few device calls as possible (each call may run 10
# minutes; a session has 30). Phases, in order; "all" is build test bench sanitize:
#   build     pip install --no-build-isolation -e . (CUDA kernels included), device facts
#   test      the whole tests/ suite on CUDA tensors, every backend available (cuda, triton, reference)
#   bench     python -m fused_resnet.bench (full) and the pytest-benchmark suite, copy bandwidth included;
#             then benchmarks/check_goals.py over its results.json into OUTDIR/goals.txt (the
#             summary also goes to summary.txt)
#   sanitize  compute-sanitizer memcheck and racecheck over a small case of each CUDA kernel
#   record    not in "all": copies OUTDIR/bench/results.json and speedup.png to
#             $RECORD_DIR/<slug>.json and .png (RECORD_DIR defaults to benchmarks/results), slug
#             being the device name lower-cased, each run of non-alphanumerics turned into '-'
#             (e.g. nvidia-h100-80gb-hbm3). Run it here, on the fetched OUTDIR (files_at), since
#             nothing but $OUT comes back from the device; then commit the two files.
# Every phase writes its log under OUTDIR and goes on after a failure, so one call brings back
# everything; the exit status is that of the first failed phase.
#
# On the device tool:  run(command="bash benchmarks/gpu_run.sh $OUT all")
# Back here:           bash benchmarks/gpu_run.sh FILES_AT record
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_run.sh OUTDIR [build|test|bench|sanitize|all|record]...}
shift
PHASES=("${@:-all}")
[[ " ${PHASES[*]} " == *" all "* ]] && PHASES=(build test bench sanitize)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
status=0

# A fetched OUTDIR is read-only: the line still goes to stdout when summary.txt cannot be written.
note() { echo "== $(date +%H:%M:%S) $*" | tee -a "$OUT/summary.txt" 2> /dev/null; }
phase_failed() { note "FAILED: $1 (exit $2)"; [[ $status -eq 0 ]] && status=$2; }

for phase in "${PHASES[@]}"; do
  case "$phase" in
  build)
    note "build"
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
      || phase_failed build $?
    $PY - > "$OUT/environment.txt" 2>&1 <<'PYEOF' || phase_failed environment $?
import torch, triton, fused_resnet
p = torch.cuda.get_device_properties(0)
print("device", torch.cuda.get_device_name(0), "sm", p.major, p.minor, "SMs", p.multi_processor_count, "L2", p.L2_cache_size)
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("backends on cuda:", fused_resnet.available_backends("cuda"))
print("extension error:", fused_resnet.EXTENSION_ERROR)
PYEOF
    cat "$OUT/environment.txt" | tee -a "$OUT/summary.txt"
    ;;
  test)
    note "test: tests/ on CUDA tensors"
    FUSED_RESNET_TEST_DEVICE=cuda $PY -m pytest tests -q -p no:cacheprovider --durations=15 \
      --junitxml="$OUT/tests-cuda.xml" > "$OUT/tests-cuda.log" 2>&1 || phase_failed test $?
    tail -n 3 "$OUT/tests-cuda.log" | tee -a "$OUT/summary.txt"
    ;;
  bench)
    note "bench: python -m fused_resnet.bench"
    # BENCH_ARGS splits the full run across calls when it would pass 10 minutes: "--dtype bf16",
    # "--modes eval,train-fwd+bwd" (the modes the goals name), "--cases channels_last" (a regex on
    # "OP MODE SHAPE LAYOUT DTYPE"), "--skip-models". check_goals.py merges the calls' results.json.
    $PY -m fused_resnet.bench ${BENCH_ARGS:-} --output "$OUT/bench" > "$OUT/bench.log" 2>"$OUT/bench.err" || phase_failed bench $?
    note "bench: benchmarks/check_goals.py"
    $PY benchmarks/check_goals.py "$OUT/bench/results.json" > "$OUT/goals.txt" 2>&1 || phase_failed check-goals $?
    sed -n '/^== summary/,$p' "$OUT/goals.txt" | tee -a "$OUT/summary.txt"
    note "bench: pytest benchmarks --benchmark-only"
    $PY -m pytest benchmarks --benchmark-only -q -p no:cacheprovider --benchmark-group-by=group \
      --benchmark-json="$OUT/pytest-benchmark.json" > "$OUT/pytest-benchmark.log" 2>&1 || phase_failed pytest-benchmark $?
    ;;
  sanitize)
    if [[ -f benchmarks/sanitize_cuda.py ]] && command -v compute-sanitizer > /dev/null; then
      for tool in memcheck racecheck; do
        note "sanitize: compute-sanitizer --tool $tool"
        compute-sanitizer --tool "$tool" --error-exitcode 9 $PY benchmarks/sanitize_cuda.py \
          > "$OUT/sanitize-$tool.log" 2>&1 || phase_failed "sanitize-$tool" $?
        tail -n 2 "$OUT/sanitize-$tool.log" | tee -a "$OUT/summary.txt"
      done
    else
      note "sanitize: skipped (no benchmarks/sanitize_cuda.py or no compute-sanitizer)"
    fi
    ;;
  record)
    dest=${RECORD_DIR:-benchmarks/results}
    if [[ ! -f "$OUT/bench/results.json" || ! -f "$OUT/bench/speedup.png" ]]; then
      note "record: no $OUT/bench/results.json or speedup.png"
      phase_failed record 1
      continue
    fi
    device=$($PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["device"])' "$OUT/bench/results.json") \
      || { phase_failed record $?; continue; }
    slug=$(echo "$device" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
    note "record: $device -> $dest/$slug.json, $dest/$slug.png"
    mkdir -p "$dest" && cp "$OUT/bench/results.json" "$dest/$slug.json" && cp "$OUT/bench/speedup.png" "$dest/$slug.png" \
      || phase_failed record $?
    ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
done
note "done, status $status"
exit $status
