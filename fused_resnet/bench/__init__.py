"""python -m fused_resnet.bench: the fused ops against eager PyTorch and torch.compile, side by side.

For each case every provider runs in the same process, interleaved round by round, so the ratios
are measured under the same conditions. An op case bn_<act> is act(batch_norm(x)), bn_add_<act>
act(batch_norm(x) + r), act relu, silu, relu6 or hardswish:
  eager     F.batch_norm(x, ...) (+ r), then the activation's function (F.relu, F.silu,
            F.hardtanh(0, 6), F.hardswish): the unfused composition
  compile   torch.compile of that composition
  <backend> fused_resnet.functional.batch_norm_activation with that backend ("cpu", "cuda", "triton")
Model-level cases run whole models: the ResNets of fused_resnet.models ("fused" is the fused twin
on the same weights) and torchvision's MobileNetV2 and EfficientNet-B0 ("fused" is
fused_resnet.convert of the eager model); "compile" / "fused+compile" are the two under
torch.compile.

Bytes counted are the fewest a fused implementation must move through memory (x, r, y, dy, dx,
dr each once; statistics and parameters are negligible):
  eval            read x (and r), write y                                   2 or 3 passes
  train-fwd       read x (and r), write y                                   2 or 3 passes
  train-fwd+bwd   forward as above; backward: read dy and x, write dx (and dr), and read y
                  where the activation is piecewise linear (relu, relu6: its derivative is
                  found there) or r where it is smooth (silu, hardswish: z = x̂·w + b + r is
                  recomputed)                                   relu 6 or 8, silu 5 or 8 passes
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
    OP_ACTS,
    OPS,
    TORCHVISION_MODELS,
    ModelResult,
    Result,
    bytes_moved,
    case_label,
    fused_providers,
    memory_format,
    model_cases,
    model_providers,
    op_cases,
    op_parts,
    providers_for,
)
from .cli import environment, main, run_cases, run_model_case, run_op_case
from .report import ResultsFile, format_model_table, format_table, plot
from .runners import build_model, input_set_count, make_copy_runner, make_model_runner, make_runner
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
    "OP_ACTS",
    "OPS",
    "TORCHVISION_MODELS",
    "ModelResult",
    "Result",
    "bytes_moved",
    "case_label",
    "fused_providers",
    "memory_format",
    "model_cases",
    "model_providers",
    "op_cases",
    "op_parts",
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
    "build_model",
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
