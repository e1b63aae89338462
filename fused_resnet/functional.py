"""Functional fused BatchNorm + ReLU and BatchNorm + residual add + ReLU.

Same argument order and running-statistics side effects as `torch.nn.functional.batch_norm`:

    batch_norm_relu(x, ...)        == F.relu(F.batch_norm(x, ...))
    batch_norm_add_relu(x, r, ...) == F.relu(F.batch_norm(x, ...) + r)

Every input is checked before anything runs or changes: a refused call leaves the running
statistics as they were. The running-statistics update of the whole package lives here
(`update_running_stats`), done in Python from the batch statistics the ops return.
"""

import math

import torch

from . import backend as _backend
from . import ops

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_inputs(
    caller,
    input,
    residual,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    num_features=None,
    check_values_per_channel=True,
):
    """Raise a clear error naming what is wrong; return nothing and change nothing.

    check_values_per_channel=False skips the "more than 1 value per channel" check of training,
    for batch statistics that span several processes (SyncBatchNorm checks the global count).
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{caller}: expected input to be a Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOATING:
        raise TypeError(
            f"{caller}: expected a floating-point input (float16, bfloat16, float32 or float64), "
            f"got {input.dtype}"
        )
    if input.dim() < 2:
        raise ValueError(
            f"{caller}: expected an input of at least 2 dimensions (N, C, ...), "
            f"got {input.dim()}D input"
        )
    channels = input.shape[1]
    if num_features is not None and channels != num_features:
        raise ValueError(
            f"{caller}: expected input with {num_features} channels (num_features), got "
            f"{channels} channels in input of shape {_fmt_shape(input.shape)}"
        )

    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{caller}: expected residual to be a Tensor, got {type(residual).__name__}")
        if residual.device != input.device:
            raise RuntimeError(
                f"{caller}: expected all tensors on {input.device}, but residual is on {residual.device}"
            )
        if residual.shape != input.shape:
            raise ValueError(
                f"{caller}: residual shape {_fmt_shape(residual.shape)} does not match input shape "
                f"{_fmt_shape(input.shape)}"
            )
        if residual.dtype != input.dtype:
            raise TypeError(
                f"{caller}: residual dtype {residual.dtype} does not match input dtype {input.dtype}"
            )

    allowed = (input.dtype, torch.float32) if input.dtype in _REDUCED_PRECISION else (input.dtype,)
    per_channel = {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias}
    for name, tensor in per_channel.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{caller}: expected {name} to be a Tensor, got {type(tensor).__name__}")
        if tensor.device != input.device:
            raise RuntimeError(
                f"{caller}: expected all tensors on {input.device}, but {name} is on {tensor.device}"
            )
        if tensor.dim() != 1 or tensor.shape[0] != channels:
            raise ValueError(
                f"{caller}: {name} should hold one value per channel, shape ({channels},) for input "
                f"of shape {_fmt_shape(input.shape)}, got shape {_fmt_shape(tensor.shape)}"
            )
        if tensor.dtype not in allowed:
            raise TypeError(
                f"{caller}: {name} dtype {tensor.dtype} is not supported with a {input.dtype} input "
                f"(expected {' or '.join(str(d) for d in allowed)})"
            )

    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{caller}: running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError(
            f"{caller}: running_mean and running_var are required when training=False "
            "(eval mode normalizes with the running statistics)"
        )
    if training and check_values_per_channel:
        values_per_channel = input.shape[0] * math.prod(input.shape[2:])
        if values_per_channel == 1:
            # The same text as torch.nn.functional.batch_norm.
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.size()}"
            )


def _blend_into(buffer, batch_value, momentum, scale=1.0):
    """buffer <- (1 - momentum) * buffer + momentum * scale * batch_value, in batch_value's dtype."""
    value = buffer.to(batch_value.dtype)  # the buffer itself when it already has that dtype
    value.mul_(1.0 - momentum).add_(batch_value, alpha=momentum * scale)
    if buffer.dtype != batch_value.dtype:
        buffer.copy_(value)


@torch.no_grad()
def update_running_stats(running_mean, running_var, batch_mean, batch_var, count, momentum):
    """nn.BatchNorm's update, the only one in the package:

    running_mean <- (1 - momentum) * running_mean + momentum * batch_mean
    running_var  <- (1 - momentum) * running_var  + momentum * batch_var * count / (count - 1)

    computed in the accumulation dtype (the batch statistics'), in place with two ops per buffer
    when the buffer has that dtype (this runs once per BatchNorm per training step, where a
    handful of tiny ops cost more than a small kernel). An empty batch leaves both untouched, as
    eager does.
    """
    if count == 0:
        return
    _blend_into(running_mean, batch_mean, momentum)
    _blend_into(running_var, batch_var, momentum, scale=count / (count - 1))


def batch_norm_act(input, residual, running_mean, running_var, weight, bias, training, momentum, eps):
    """relu(batch_norm(input) (+ residual)) on already-checked arguments.

    training=True normalizes with the batch statistics and, when running buffers are given,
    updates them with `momentum`; training=False normalizes with the running statistics.
    """
    impl = _backend.resolve(input.device)
    if impl.bn_act is not None:  # one op: the kernels and the running-statistics update (csrc)
        args = (input, residual, weight, bias, running_mean, running_var, training, momentum, eps)
        if ops.profiler_active():
            with ops.profiled(residual is not None, "fwd"):
                return impl.bn_act(*args)[0]
        return impl.bn_act(*args)[0]
    if not training:
        return ops.forward_eval(input, residual, running_mean, running_var, weight, bias, eps)
    out, batch_mean, _invstd, batch_var = ops.forward_train(input, residual, weight, bias, eps)
    if running_mean is not None:
        count = input.numel() // input.shape[1] if input.shape[1] else 0
        update_running_stats(running_mean, running_var, batch_mean, batch_var, count, momentum)
    return out


def batch_norm_relu(
    input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    """relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps))."""
    check_inputs("batch_norm_relu", input, None, running_mean, running_var, weight, bias, training)
    return batch_norm_act(input, None, running_mean, running_var, weight, bias, training, momentum, eps)


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
    check_inputs("batch_norm_add_relu", input, residual, running_mean, running_var, weight, bias, training)
    return batch_norm_act(
        input, residual, running_mean, running_var, weight, bias, training, momentum, eps
    )


__all__ = ["batch_norm_relu", "batch_norm_add_relu", "update_running_stats"]
