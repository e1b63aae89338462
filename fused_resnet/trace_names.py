"""Profiler names: every fused forward and backward runs inside a record_function named
"fused_resnet::bn_<act>_fwd" or "fused_resnet::bn_add_<act>_bwd" ("bn_relu_fwd",
"bn_add_silu_bwd", "bn_add_identity_fwd", ...), whatever the backend, so a trace shows them under
one name. The C++ backends record them in C++ (csrc/common/device_ops.cpp and
bn_act_autograd.cpp); the Python backends through `profiled`. Compiled graphs name the ops
themselves, so tracing skips it.
"""

import contextlib

import torch

# record_function costs ~10 µs a call even with no profiler running, so it is entered only when one is.
_profiler_enabled = torch._C._autograd._profiler_enabled


def profiler_active():
    return not torch.compiler.is_compiling() and _profiler_enabled()


def trace_name(has_residual: bool, direction: str, act: str = "relu") -> str:
    return f"fused_resnet::bn_{'add_' if has_residual else ''}{act}_{direction}"


def profiled(has_residual: bool, direction: str, act: str = "relu"):
    if not profiler_active():
        return contextlib.nullcontext()
    return torch.profiler.record_function(trace_name(has_residual, direction, act))
