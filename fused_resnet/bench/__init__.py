"""python -m fused_resnet.bench: the fused ops against eager PyTorch and torch.compile, side by side.

For each case every provider runs in the same process, interleaved round by round, so the ratios
are measured under the same conditions:
  eager     F.relu(F.batch_norm(x, ...) (+ r)), the unfused composition
  compile   torch.compile of that composition
  <backend> fused_resnet.functional with that backend ("cpu", "cuda", "triton")
Model-level cases run whole ResNets (fused_resnet.models): "eager" is the plain model, "fused" its
fused twin on the same weights, and "compile" / "fused+compile" the two under torch.compile.

Bytes counted are the fewest a fused implementation must move through memory (x, r, y, dy, dx,
dr each once; statistics and parameters are negligible):
  eval            read x (and r), write y                                   2 or 3 passes
  train-fwd       read x (and r), write y                                   2 or 3 passes
  train-fwd+bwd   forward as above; backward: read dy, y, x, write dx (and dr)  6 or 8 passes
GB/s is those bytes over the median time; "%bw" divides it by the rate of a copy (bytes read +
bytes written per second): on a GPU the device's, measured once per run with a large tensor copy;
on a CPU a copy of the case's own input (input sets rotated as the providers', one output tensor
reused as the allocator reuses theirs), timed in the case's rounds. A fused training forward that
reads x twice (statistics, then apply) tops out near 2/3 of that.

Model rows also give the memory a training step keeps for its backward ("kept MiB"): bytes
allocated after the forward above those allocated before it (timing.backward_kept_bytes).
"""

from .cases import (
    CPU_CASES,
    CPU_MODEL_CASES,
    CPU_QUICK_CASES,
    DTYPES,
    GPU_CASES,
    GPU_MODEL_CASES,
    GPU_QUICK_CASES,
    MODEL_MODES,
    MODEL_PROVIDERS,
    MODES,
    OPS,
    ModelResult,
    Result,
    bytes_moved,
    case_label,
    fused_providers,
    memory_format,
    model_cases,
    model_providers,
    op_cases,
    providers_for,
)
from .cli import environment, main, run_cases, run_model_case, run_op_case
from .report import ResultsFile, format_model_table, format_table, plot
from .runners import input_set_count, make_copy_runner, make_model_runner, make_runner
from .timing import (
    backward_kept_bytes,
    copy_bandwidth_gbps,
    describe_failure,
    measure,
    peak_memory_bytes,
    time_ms,
    time_side_by_side,
)

# the package's interface: what tests, benchmarks/ and gpu_check.sh use
__all__ = [
    "CPU_CASES",
    "CPU_MODEL_CASES",
    "CPU_QUICK_CASES",
    "DTYPES",
    "GPU_CASES",
    "GPU_MODEL_CASES",
    "GPU_QUICK_CASES",
    "MODEL_MODES",
    "MODEL_PROVIDERS",
    "MODES",
    "OPS",
    "ModelResult",
    "Result",
    "bytes_moved",
    "case_label",
    "fused_providers",
    "memory_format",
    "model_cases",
    "model_providers",
    "op_cases",
    "providers_for",
    "environment",
    "main",
    "run_cases",
    "run_model_case",
    "run_op_case",
    "ResultsFile",
    "format_model_table",
    "format_table",
    "plot",
    "input_set_count",
    "make_copy_runner",
    "make_model_runner",
    "make_runner",
    "backward_kept_bytes",
    "copy_bandwidth_gbps",
    "describe_failure",
    "measure",
    "peak_memory_bytes",
    "time_ms",
    "time_side_by_side",
]
