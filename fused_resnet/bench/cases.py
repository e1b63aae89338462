"""The cases of fused_resnet.bench: op-level shapes, layouts, dtypes and modes, the model cases, the
providers each runs, and the bytes a fused implementation must move.
"""

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

import fused_resnet

OPS = ("bn_relu", "bn_add_relu")

MODES = ("eval", "train-fwd", "train-fwd+bwd")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (shape, layout). GPU: the ResNet-50 stage outputs at batch 64 and a video shape. CPU: the same
# stages at batch sizes this machine runs in seconds.
GPU_CASES = [
    (shape, layout)
    for shape in [(64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7), (16, 64, 8, 56, 56)]
    for layout in ("contiguous", "channels_last")
]

GPU_QUICK_CASES = [((64, 256, 56, 56), "contiguous"), ((64, 256, 56, 56), "channels_last")]

CPU_CASES = [
    ((8, 256, 56, 56), "contiguous"),
    ((8, 64, 56, 56), "channels_last"),
    ((8, 1024, 14, 14), "channels_last"),
    ((2, 64, 8, 56, 56), "contiguous"),
]

CPU_QUICK_CASES = [((4, 64, 28, 28), "contiguous"), ((4, 64, 28, 28), "channels_last")]

# (model builder in fused_resnet.models, input shape). Images for 2D models, clips for 3D ones.
# On a CPU, compiling the models dominates the run (torch.compile of one ResNet-50 training step
# took 8 minutes on a shared 2-core machine), so the CPU cases are the 18-layer twins.
GPU_MODEL_CASES = [("resnet50", (128, 3, 224, 224)), ("resnet3d_50", (8, 3, 16, 112, 112))]

CPU_MODEL_CASES = [("resnet18", (4, 3, 64, 64)), ("resnet3d_18", (2, 3, 4, 48, 48))]

CPU_QUICK_MODEL_CASES = [("resnet50", (2, 3, 32, 32))]

MODEL_MODES = ("eval", "train")

MODEL_PROVIDERS = ("eager", "fused", "compile", "fused+compile")

@dataclass
class Result:
    op: str
    shape: tuple
    dtype: str
    layout: str
    mode: str
    provider: str
    ms: float
    gbps: float
    bandwidth_fraction: float
    peak_memory_bytes: Optional[int] = 0  # None when the provider failed
    speedup_vs_eager: float = float("nan")
    speedup_vs_compile: float = float("nan")
    error: str = ""  # "ExceptionType: first line" when the provider failed; its numbers are NaN
    copy_gbps: float = float("nan")  # the copy rate bandwidth_fraction divides by (cli.run_op_case)

@dataclass
class ModelResult:
    model: str
    input_shape: tuple
    dtype: str
    layout: str
    mode: str
    provider: str
    ms: float
    items_per_s: float
    peak_memory_bytes: Optional[int] = 0  # None when the provider failed
    # Training rows: bytes allocated after the forward above those before it, what autograd holds
    # for the backward (timing.backward_kept_bytes). None for eval rows, which have no backward,
    # and failed ones.
    backward_kept_bytes: Optional[int] = None
    speedup_vs_eager: float = float("nan")
    speedup_vs_compile: float = float("nan")
    note: str = field(default="")
    error: str = ""  # as in Result


def memory_format(layout, ndim):
    if layout != "channels_last":
        return torch.contiguous_format
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def bytes_moved(op, mode, numel, element_size):
    passes = {"eval": 2, "train-fwd": 2, "train-fwd+bwd": 6}[mode]
    if op == "bn_add_relu":
        passes += {"eval": 1, "train-fwd": 1, "train-fwd+bwd": 2}[mode]
    return passes * numel * element_size


def fused_providers(device):
    """Fused backends worth timing on `device`: not the eager "reference", and not Triton's CPU
    interpreter (a correctness tool, orders of magnitude slower than a kernel)."""
    device = torch.device(device)
    return [
        name
        for name in fused_resnet.available_backends(device)
        if name != "reference" and not (name == "triton" and device.type == "cpu")
    ]


def providers_for(device):
    return ["eager", "compile"] + fused_providers(device)


def case_label(dtype_name, shape, layout, op, mode):
    """The text --cases matches, e.g. "bn_add_relu train-fwd+bwd 64x256x56x56 channels_last bf16"."""
    return f"{op} {mode} {'x'.join(map(str, shape))} {layout} {dtype_name}"


def op_cases(device, dtype_names, quick, modes=MODES, pattern=None):
    """Op-level cases, optionally only `modes` and those whose case_label matches the regex `pattern`."""
    if device.type == "cuda":
        cases = GPU_QUICK_CASES if quick else GPU_CASES
    else:
        cases = CPU_QUICK_CASES if quick else CPU_CASES
    todo = [
        (dtype_name, shape, layout, op, mode)
        for dtype_name in dtype_names
        for shape, layout in cases
        for op in OPS
        for mode in modes
    ]
    if pattern is not None:
        todo = [case for case in todo if re.search(pattern, case_label(*case))]
    return todo


def model_cases(device, dtype_names, quick):
    if device.type == "cuda":
        cases = GPU_MODEL_CASES[:1] if quick else GPU_MODEL_CASES
        # A GPU trains in reduced precision and channels_last: the setting the goals are set for.
        dtype_name = next((d for d in dtype_names if d != "fp32"), dtype_names[0])
        layout = "channels_last"
    else:
        cases = CPU_QUICK_MODEL_CASES if quick else CPU_MODEL_CASES
        dtype_name, layout = "fp32", "contiguous"
    return [(name, shape, dtype_name, layout, mode) for name, shape in cases for mode in MODEL_MODES]


def model_providers(device, quick):
    # torch.compile of a whole ResNet takes minutes on a small CPU: a quick CPU run leaves it out.
    if quick and device.type == "cpu":
        return ("eager", "fused")
    return MODEL_PROVIDERS
