"""Functional fused BatchNorm + activation and BatchNorm + residual add + activation.

Same argument order and running-statistics side effects as `torch.nn.functional.batch_norm`:

    batch_norm_relu(x, ...)                     == F.relu(F.batch_norm(x, ...))
    batch_norm_add_relu(x, r, ...)              == F.relu(F.batch_norm(x, ...) + r)
    batch_norm_activation(x, ..., act="silu")   == F.silu(F.batch_norm(x, ...))
    batch_norm_activation(x, ..., residual=r, act="identity") == F.batch_norm(x, ...) + r

Each is one call of the backend's bn_act op, which checks every argument (the op contract,
fused_resnet/contract.py) before anything runs or changes: a refused call leaves the running
statistics as they were.
"""

import torch

from . import backend as _backend
from . import contract
from .contract import DEFAULT_ACT, DEFAULT_NEGATIVE_SLOPE
from .reference import activation, update_running_stats


def batch_norm_act(input, residual, weight, bias, running_mean, running_var, training, momentum, eps,
                   act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE):
    """act(batch_norm(input) (+ residual)): the call every module and function makes (bn_act's
    arguments, its output).

    In eval under torch.compile it is the eager composition instead: a normalization with the
    running statistics is one elementwise pass, which the compiler generates as well as a kernel
    and fuses with its neighbours, where an op it cannot see into stays a call of its own between
    them (and costs its host time). It checks the arguments as the op does first (the contract's
    Python half, traced once per graph), so compiled and uncompiled calls refuse the same calls.
    Training, and eval with batch statistics, run the op.
    """
    if not training and torch.compiler.is_compiling():
        contract.check_bn_act(
            input, residual, weight, bias, running_mean, running_var, training, eps, act, negative_slope
        )
        # torch.batch_norm, F.batch_norm's op without its eps check: torch before 2.13 refuses eps 0
        # in eval, which the op takes (AddReLU's identity statistics: rsqrt(1 + 0) = 1).
        out = torch.batch_norm(
            input, weight, bias, running_mean, running_var, False, 0.0, eps, torch.backends.cudnn.enabled
        )
        return activation(out if residual is None else out + residual, act, negative_slope)
    return _backend.ops_for(input).bn_act(
        input, residual, weight, bias, running_mean, running_var, training, momentum, eps, act, negative_slope
    )[0]


def batch_norm_relu(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    """relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))."""
    return batch_norm_act(input, None, weight, bias, running_mean, running_var, training, momentum, eps)


def batch_norm_add_relu(
    input,
    residual,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
):
    """relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) + residual)."""
    return batch_norm_act(input, residual, weight, bias, running_mean, running_var, training, momentum, eps)


def batch_norm_activation(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
    *,
    residual=None,
    act=DEFAULT_ACT,
    negative_slope=DEFAULT_NEGATIVE_SLOPE,
):
    """act(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    (+ residual)), act one of contract.ACTIVATIONS."""
    return batch_norm_act(
        input, residual, weight, bias, running_mean, running_var, training, momentum, eps, act, negative_slope
    )


__all__ = ["batch_norm_relu", "batch_norm_add_relu", "batch_norm_activation", "update_running_stats"]
