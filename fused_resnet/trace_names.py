"""Profiler names: every fused forward and backward runs inside a record_function named
"fused_resnet::bn_relu_fwd", "fused_resnet::bn_add_relu_bwd", ..., whatever the backend, so a trace
shows them under one name. The C++ backends record them in C++ (csrc/common/device_ops.cpp and
bn_act_autograd.cpp); the Python backends through `profiled`. Compiled graphs name the ops
themselves, so tracing skips it.
"""

import contextlib

import torch

# record_function costs ~10 µs a call even with no profiler running, so it is entered only when one is.
_profiler_enabled = torch._C._autograd._profiler_enabled


def profiler_active():
    return not torch.compiler.is_compiling() and _profiler_enabled()


def profiled(has_residual: bool, direction: str):
    if not profiler_active():
        return contextlib.nullcontext()
    op = "bn_add_relu" if has_residual else "bn_relu"
    return torch.profiler.record_function(f"fused_resnet::{op}_{direction}")
