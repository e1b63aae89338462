#!/usr/bin/env bash
# benchmarks/gpu_run.sh OUTDIR [build|test|bench|sanitize|all]...
#
# Everything a GPU session must do, in as few device calls as possible (each call may run 10
# minutes; a session has 30). Phases, in order; "all" is build test bench sanitize:
#   build     pip install --no-build-isolation -e . (CUDA kernels included), device facts
#   test      the whole tests/ suite on CUDA tensors, every backend available (cuda, triton, reference)
#   bench     python -m fused_resnet.bench (full) and the pytest-benchmark suite, copy bandwidth included
#   sanitize  compute-sanitizer memcheck and racecheck over a small case of each CUDA kernel
# Every phase writes its log under OUTDIR and goes on after a failure, so one call brings back
# everything; the exit status is that of the first failed phase.
#
# On the device tool:  run(command="bash benchmarks/gpu_run.sh $OUT all")
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_run.sh OUTDIR [build|test|bench|sanitize|all]...}
shift
PHASES=("${@:-all}")
[[ " ${PHASES[*]} " == *" all "* ]] && PHASES=(build test bench sanitize)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
status=0

note() { echo "== $(date +%H:%M:%S) $*" | tee -a "$OUT/summary.txt"; }
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
    # BENCH_ARGS (e.g. "--dtype bf16") splits the full run across calls when it would pass 10 minutes.
    $PY -m fused_resnet.bench ${BENCH_ARGS:-} --output "$OUT/bench" > "$OUT/bench.log" 2>"$OUT/bench.err" || phase_failed bench $?
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
  *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
done
note "done, status $status"
exit $status
