"""The one op API of fused_resnet: fake impls, autograd, and dispatch to a backend.

Ops (schemas in csrc/fused_resnet.cpp, where the math is written out):
  bn_act(input, residual?, weight?, bias?, running_mean(a!)?, running_var(b!)?, training, momentum,
         eps) -> (out, save_mean, save_invstd, relu_mask)
      the C++ backends' module op: forward and running-statistics update in one call, autograd
      in C++ (csrc/common/bn_act_autograd.cpp); this file gives it its fake impl only
  bn_act_fwd_train(input, residual?, weight?, bias?, eps)
      -> (out, save_mean, save_invstd, batch_var, relu_mask)
  bn_act_fwd_eval(input, residual?, running_mean, running_var, weight?, bias?, eps) -> out
  bn_act_bwd(grad_out, out, relu_mask, input, weight?, mean, invstd, batch_stats, residual_grad)
      -> (grad_input, grad_residual, grad_weight, grad_bias)
and the pieces of the training ops that SyncBatchNorm runs around its collectives:
  bn_stats(input) -> (mean, var)
  bn_act_bwd_reduce(grad_out, out, input, mean, invstd) -> (sum_dz_xhat, sum_dz)
  bn_act_bwd_apply(grad_out, out, input, weight?, mean, invstd, mean_dz, mean_dz_xhat, residual_grad)
      -> (grad_input, grad_residual)

relu_mask is the ReLU mask the training forward keeps for its backward, in a packed form of the
backend's own (or empty: the backward then takes the mask from out); autograd passes it from one
to the other and `forward_train` does not return it.

Every compiled backend implements the six functional ops; `register_op_set` gives any such set the same
fake impls and the same autograd formula, so backends differ only in their kernels. The
"reference" backend is the eager composition in reference.py (autograd from eager ops).

Callers use `forward_train` / `forward_eval`, which pick the backend for the input's device.
"""

import contextlib

import torch

from . import backend as _backend
from . import reference
from .reference import acc_dtype

# ---------------------------------------------------------------------------------------------
# Output layout shared by every backend and by the fake impls: a dense NC* or channels_last input
# is used as it is, anything else is made contiguous first; outputs are allocated like that
# canonical input (so a channels_last input gives a channels_last output).


def canonical_layout(input: torch.Tensor) -> torch.Tensor:
    if input.is_contiguous():
        return input
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return input
    if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        return input
    return input.contiguous()


def _empty_activation(input: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(canonical_layout(input))


def _empty_channel_stat(input: torch.Tensor) -> torch.Tensor:
    return input.new_empty((input.shape[1],), dtype=acc_dtype(input.dtype))


def empty_relu_mask(input: torch.Tensor, size=0) -> torch.Tensor:
    return input.new_empty((size,), dtype=torch.uint8)


def cpu_relu_mask_bytes(input: torch.Tensor):
    """Length of the C++ ops' relu_mask (csrc/fused_resnet.cpp): one bit per element for a CPU
    input in the rows layout (channels_last, or no spatial dimensions), else 0."""
    if input.device.type != "cpu":
        return 0
    spatial = 1
    for size in input.shape[2:]:
        spatial *= size
    rows = not canonical_layout(input).is_contiguous() or spatial == 1
    return (input.numel() + 7) // 8 if rows else 0


def no_relu_mask_bytes(input: torch.Tensor):
    return 0


def _make_fake_fwd_train(relu_mask_bytes):
    def fake_fwd_train(input, residual, weight, bias, eps):
        stat = _empty_channel_stat
        mask = empty_relu_mask(input, relu_mask_bytes(input))
        return _empty_activation(input), stat(input), stat(input), stat(input), mask

    return fake_fwd_train


def _fake_fwd_eval(input, residual, running_mean, running_var, weight, bias, eps):
    return _empty_activation(input)


def empty_grad_residual(input, residual_grad):
    """grad_residual of the backward ops: like the canonical input, or an empty tensor when not asked for."""
    return _empty_activation(input) if residual_grad else input.new_empty((0,))


def _fake_bwd(grad_out, out, relu_mask, input, weight, mean, invstd, batch_stats, residual_grad):
    stat = _empty_channel_stat
    return (
        _empty_activation(input), empty_grad_residual(input, residual_grad), stat(input), stat(input)
    )


def _fake_bn_act(input, residual, weight, bias, running_mean, running_var, training, momentum, eps):
    if not training:  # no batch statistics, no mask
        acc = acc_dtype(input.dtype)
        return _empty_activation(input), input.new_empty((0,), dtype=acc), input.new_empty((0,), dtype=acc), empty_relu_mask(input)
    stat = _empty_channel_stat
    return _empty_activation(input), stat(input), stat(input), empty_relu_mask(input, cpu_relu_mask_bytes(input))


def _fake_stats(input):
    return _empty_channel_stat(input), _empty_channel_stat(input)


def _fake_bwd_reduce(grad_out, out, input, mean, invstd):
    return _empty_channel_stat(input), _empty_channel_stat(input)


def _fake_bwd_apply(grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat, residual_grad):
    return _empty_activation(input), empty_grad_residual(input, residual_grad)


# ---------------------------------------------------------------------------------------------
# Profiler names: every fused forward and backward runs inside record_function
# "fused_resnet::bn_relu_fwd", "fused_resnet::bn_add_relu_bwd", ..., whatever the backend, so a
# trace shows them under one name. Compiled graphs name the ops themselves, so tracing skips it.


# record_function costs ~10 µs a call even with no profiler running, so it is entered only when one is.
_profiler_enabled = torch._C._autograd._profiler_enabled


def profiler_active():
    return not torch.compiler.is_compiling() and _profiler_enabled()


def profiled(has_residual: bool, direction: str):
    if not profiler_active():
        return contextlib.nullcontext()
    op = "bn_add_relu" if has_residual else "bn_relu"
    return torch.profiler.record_function(f"fused_resnet::{op}_{direction}")


# ---------------------------------------------------------------------------------------------
# Autograd, one formula for every op set. The forward ops return statistics that are not
# differentiable; gradients flow to input, residual, weight and bias only.


def _param_grad(grad, param, needed):
    if not needed or param is None:
        return None
    return grad if grad.dtype == param.dtype else grad.to(param.dtype)


def _make_autograd(bwd_op):
    def setup_train(ctx, inputs, output):
        input, residual, weight, bias, _eps = inputs
        out, save_mean, save_invstd, _batch_var, relu_mask = output
        ctx.save_for_backward(input, out, relu_mask, weight, bias, save_mean, save_invstd)
        ctx.mark_non_differentiable(*output[1:])
        ctx.has_residual = residual is not None

    def backward_train(ctx, grad_out, _grad_mean, _grad_invstd, _grad_var, _grad_mask):
        input, out, relu_mask, weight, bias, mean, invstd = ctx.saved_tensors
        need_input, need_residual, need_weight, need_bias, _ = ctx.needs_input_grad
        with profiled(ctx.has_residual, "bwd"):
            grad_input, grad_residual, grad_weight, grad_bias = bwd_op(
                grad_out, out, relu_mask, input, weight, mean, invstd, True, need_residual
            )
        return (
            grad_input if need_input else None,
            grad_residual if need_residual else None,
            _param_grad(grad_weight, weight, need_weight),
            _param_grad(grad_bias, bias, need_bias),
            None,
        )

    def setup_eval(ctx, inputs, output):
        # The statistics are taken now: the running buffers may be updated in place before backward.
        input, residual, running_mean, running_var, weight, bias, eps = inputs
        ctx.has_residual = residual is not None
        acc = acc_dtype(input.dtype)
        mean = running_mean.to(acc, copy=True)
        invstd = torch.rsqrt(running_var.to(acc, copy=True).add_(eps))
        ctx.save_for_backward(input, output, weight, bias, mean, invstd)

    def backward_eval(ctx, grad_out):
        input, out, weight, bias, mean, invstd = ctx.saved_tensors
        need_input, need_residual, _, _, need_weight, need_bias, _ = ctx.needs_input_grad
        with profiled(ctx.has_residual, "bwd"):
            grad_input, grad_residual, grad_weight, grad_bias = bwd_op(
                grad_out, out, empty_relu_mask(input), input, weight, mean, invstd, False,
                need_residual,
            )
        return (
            grad_input if need_input else None,
            grad_residual if need_residual else None,
            None,
            None,
            _param_grad(grad_weight, weight, need_weight),
            _param_grad(grad_bias, bias, need_bias),
            None,
        )

    return (backward_train, setup_train), (backward_eval, setup_eval)


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "fused_resnet: double backward (a gradient of a gradient through the fused BatchNorm) is "
        "not supported"
    )


def register_op_set(fwd_train, fwd_eval, bwd, stats, bwd_reduce, bwd_apply, relu_mask_bytes):
    """Give a backend's six ops (OpOverloads or triton_op handles) their fake impls and autograd.

    relu_mask_bytes(input): the length of the relu_mask its fwd_train returns for that input.
    stats / bwd_reduce / bwd_apply are called only inside SyncBatchNorm's autograd.Function, so
    they get fake impls and no autograd formula.
    """
    torch.library.register_fake(fwd_train, _make_fake_fwd_train(relu_mask_bytes))
    torch.library.register_fake(fwd_eval, _fake_fwd_eval)
    torch.library.register_fake(bwd, _fake_bwd)
    torch.library.register_fake(stats, _fake_stats)
    torch.library.register_fake(bwd_reduce, _fake_bwd_reduce)
    torch.library.register_fake(bwd_apply, _fake_bwd_apply)
    (backward_train, setup_train), (backward_eval, setup_eval) = _make_autograd(bwd)
    torch.library.register_autograd(fwd_train, backward_train, setup_context=setup_train)
    torch.library.register_autograd(fwd_eval, backward_eval, setup_context=setup_eval)
    torch.library.register_autograd(bwd, _no_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---------------------------------------------------------------------------------------------
# Backend registration.

_backend.register(
    _backend.Backend(
        name="reference",
        device_types=("cpu", "cuda"),
        fwd_train=reference.bn_act_fwd_train,
        fwd_eval=reference.bn_act_fwd_eval,
        stats=reference.bn_stats,
        bwd_reduce=reference.bn_act_bwd_reduce,
        bwd_apply=reference.bn_act_bwd_apply,
    )
)


def _register_compiled_backends(extension_error):
    """The C++ ops: CPU kernels always, CUDA kernels when the extension was built with them."""
    if extension_error is not None:
        reason = f"the C++ extension fused_resnet._C failed to load ({extension_error})"
        _backend.mark_unavailable("cpu", reason)
        _backend.mark_unavailable("cuda", reason)
        return
    ops = torch.ops.fused_resnet
    # bn_act: fake impl here, autograd in C++ (csrc/common/bn_act_autograd.cpp)
    torch.library.register_fake(ops.bn_act.default, _fake_bn_act)
    register_op_set(
        ops.bn_act_fwd_train.default,
        ops.bn_act_fwd_eval.default,
        ops.bn_act_bwd.default,
        ops.bn_stats.default,
        ops.bn_act_bwd_reduce.default,
        ops.bn_act_bwd_apply.default,
        relu_mask_bytes=cpu_relu_mask_bytes,
    )
    for device_type in ("cpu", "cuda"):
        has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
            ops.bn_act_fwd_train.default.name(), device_type.upper()
        )
        if has_kernel:
            _backend.register(
                _backend.Backend(
                    name=device_type,
                    device_types=(device_type,),
                    fwd_train=ops.bn_act_fwd_train.default,
                    fwd_eval=ops.bn_act_fwd_eval.default,
                    stats=ops.bn_stats.default,
                    bwd_reduce=ops.bn_act_bwd_reduce.default,
                    bwd_apply=ops.bn_act_bwd_apply.default,
                    bn_act=ops.bn_act.default,
                )
            )


# ---------------------------------------------------------------------------------------------
# The entry points used by functional.py and the modules.


def forward_train(input, residual, weight, bias, eps):
    """Batch-statistics forward: (out, save_mean, save_invstd, batch_var). (Autograd keeps the
    op's relu_mask for the backward.)"""
    impl = _backend.resolve(input.device)
    with profiled(residual is not None, "fwd"):
        out, save_mean, save_invstd, batch_var, _relu_mask = impl.fwd_train(
            input, residual, weight, bias, eps
        )
    return out, save_mean, save_invstd, batch_var


def forward_eval(input, residual, running_mean, running_var, weight, bias, eps):
    """Running-statistics forward: out."""
    impl = _backend.resolve(input.device)
    with profiled(residual is not None, "fwd"):
        return impl.fwd_eval(input, residual, running_mean, running_var, weight, bias, eps)
