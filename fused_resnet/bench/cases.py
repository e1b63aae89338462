"""The cases of fused_resnet.bench: op-level shapes, layouts, dtypes and modes, the model cases, the
providers each runs, and the bytes a fused implementation must move.
"""

import re
from dataclasses import dataclass, field
from typing import Optional

import torch

import fused_resnet
from fused_resnet import contract

# The op cases: "bn_<act>" is act(batch_norm(x)), "bn_add_<act>" act(batch_norm(x) + r). ReLU is
# the ResNets'; SiLU the EfficientNets' and the detectors', ReLU6 MobileNetV2's, Hardswish
# MobileNetV3's.
OP_ACTS = ("relu", "silu", "relu6", "hardswish")
OPS = tuple(f"bn_{'add_' if residual else ''}{act}" for act in OP_ACTS for residual in (False, True))


def op_parts(op):
    """(activation, has a residual) of an op case's name: "bn_add_silu" -> ("silu", True)."""
    residual = op.startswith("bn_add_")
    act = op[len("bn_add_" if residual else "bn_"):]
    if not op.startswith("bn_") or act not in contract.ACTIVATIONS:
        raise ValueError(f"unknown op case {op!r}: expected bn_<act> or bn_add_<act>, act one of {', '.join(contract.ACTIVATIONS)}")
    return act, residual


MODES = ("eval", "train-fwd", "train-fwd+bwd")

# The modes of the ops other than ReLU: those their goals are set in (a training forward alone
# is timed for the ReLU ops, where it tells the two halves of the fwd+bwd apart).
ACT_MODES = ("eval", "train-fwd+bwd")

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

# (model, input shape). Images for 2D models, clips for 3D ones. The ResNets are fused_resnet.models'
# builders (fused=True for the fused twin); the TORCHVISION_MODELS are torchvision's, the fused
# one fused_resnet.convert of the eager model, as a user converts it. On a CPU, compiling the models
# dominates the run (torch.compile of one ResNet-50 training step took 8 minutes on a shared 2-core
# machine), so the CPU cases are the 18-layer twins and small inputs.
TORCHVISION_MODELS = ("mobilenet_v2", "efficientnet_b0")

GPU_MODEL_CASES = [
    ("resnet50", (128, 3, 224, 224)),
    ("resnet3d_50", (8, 3, 16, 112, 112)),
    ("mobilenet_v2", (128, 3, 224, 224)),
    ("efficientnet_b0", (128, 3, 224, 224)),
]

CPU_MODEL_CASES = [
    ("resnet18", (4, 3, 64, 64)),
    ("resnet3d_18", (2, 3, 4, 48, 48)),
    ("mobilenet_v2", (4, 3, 64, 64)),
    ("efficientnet_b0", (4, 3, 64, 64)),
]

CPU_QUICK_MODEL_CASES = [("resnet50", (2, 3, 32, 32)), ("mobilenet_v2", (2, 3, 32, 32)), ("efficientnet_b0", (2, 3, 32, 32))]

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
    """The fewest bytes a fused implementation moves (the package docstring's table): the forward
    reads x (and r) and writes y; the backward reads dy and x, writes dx (and dr), and finds the
    activation's derivative in y where it is piecewise linear, or recomputes it from x (and r)
    where it is smooth. (The CPU's 1-bit mask in place of y is not counted.)"""
    act, residual = op_parts(op)
    passes = 2 + residual
    if mode == "train-fwd+bwd":
        backward_reads = ("y",) if contract.backward_reads_out(act) else ()
        backward_reads += ("r",) if residual and contract.backward_recomputes_z(act) else ()
        passes += 3 + residual + len(backward_reads)
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


def op_cases(device, dtype_names, quick, modes=MODES, pattern=None, ops=OPS):
    """Op-level cases of `ops`, optionally only `modes` and those whose case_label matches the regex `pattern`."""
    if device.type == "cuda":
        cases = GPU_QUICK_CASES if quick else GPU_CASES
    else:
        cases = CPU_QUICK_CASES if quick else CPU_CASES
    todo = [
        (dtype_name, shape, layout, op, mode)
        for dtype_name in dtype_names
        for shape, layout in cases
        for op in ops
        for mode in modes
        if op_parts(op)[0] == "relu" or mode in ACT_MODES
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
