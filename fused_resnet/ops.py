"""The one op API of fused_resnet: the fake impls and autograd every compiled backend's ops get
(fused_resnet/backends registers the backends, each through register_op_set).

Every backend implements the ops of `contract.OpSet` (schemas and math in csrc/fused_resnet.cpp).
The user-facing op, the one a module call runs:
  bn_act(input, residual?, weight?, bias?, running_mean(a!)?, running_var(b!)?, training, momentum,
         eps) -> (out, save_mean, save_invstd, act_mask)
      the forward and, in training, the running-statistics update in place, with its autograd
      (C++ for the C++ backends, `register_bn_act_autograd` here for the triton backend); one
      _bn_act_bwd in the backward.
The internal ops (a leading underscore in the dispatcher, contract.schema_name):
  _bn_act_fwd_train(input, residual?, weight?, bias?, eps)
      -> (out, save_mean, save_invstd, batch_var, act_mask)
      with autograd: nn.BatchNorm's momentum=None path calls it under torch.compile
  _bn_act_fwd_eval(input, residual?, running_mean, running_var, weight?, bias?, eps) -> out
  _bn_act_bwd(grad_out, out, act_mask, input, weight?, mean, invstd, batch_stats, residual_grad)
      -> (grad_input, grad_residual, grad_weight, grad_bias)
and the pieces of the training ops that SyncBatchNorm runs around its collectives:
  _bn_stats(input) -> (mean, var)
  _bn_act_bwd_reduce(grad_out, out, input, mean, invstd) -> (sum_dz_xhat, sum_dz)
  _bn_act_bwd_apply(grad_out, out, input, weight?, mean, invstd, mean_dz, mean_dz_xhat, residual_grad)
      -> (grad_input, grad_residual)

act_mask is the ReLU mask the training forward keeps for its backward, in a packed form of the
backend's own (or empty: the backward then takes the mask from out); autograd passes it from one
to the other.

`register_op_set` gives a compiled backend's ops (C++ or Triton) the same fake impls, which check
their arguments as the kernels do (contract.py), and _bn_act_fwd_train its autograd, so backends
differ only in their kernels. The "reference" backend is the eager composition in reference.py
(autograd from eager ops).
"""
import torch

from . import contract
from .contract import OpSet, canonical_layout
from .contract import DEFAULT_ACT, DEFAULT_NEGATIVE_SLOPE, acc_dtype
from .trace_names import profiled

# ---------------------------------------------------------------------------------------------
# Fake impls: outputs laid out like the canonical input (contract.canonical_layout).


def _empty_activation(input: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(canonical_layout(input))


def _empty_channel_stat(input: torch.Tensor) -> torch.Tensor:
    return input.new_empty((input.shape[1],), dtype=acc_dtype(input.dtype))


def empty_act_mask(input: torch.Tensor, size=0) -> torch.Tensor:
    return input.new_empty((size,), dtype=torch.uint8)


def empty_grad_residual(input, residual_grad):
    """grad_residual of the backward ops: like the canonical input, or an empty tensor when not asked for."""
    return _empty_activation(input) if residual_grad else input.new_empty((0,))


def cpu_act_mask_bytes(input: torch.Tensor, act: str = DEFAULT_ACT):
    """Length of the C++ ops' act_mask (csrc/fused_resnet.cpp): one bit per element for a CPU
    input in the rows layout and a piecewise-linear activation (contract.backward_reads_out),
    else 0."""
    if input.device.type != "cpu" or not contract.backward_reads_out(act):
        return 0
    return (input.numel() + 7) // 8 if contract.is_rows_layout(input) else 0


def no_act_mask_bytes(input: torch.Tensor, act: str = DEFAULT_ACT):
    return 0


def _fake_ops(act_mask_bytes) -> OpSet:
    """The fake impls of an op set whose bn_act_fwd_train returns act_mask_bytes(input) bytes."""

    def bn_act(input, residual, weight, bias, running_mean, running_var, training, momentum, eps, act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE):
        contract.check_bn_act(
            input, residual, weight, bias, running_mean, running_var, training, eps, act, negative_slope
        )
        if not training:  # no batch statistics, no mask
            acc = acc_dtype(input.dtype)
            none = input.new_empty((0,), dtype=acc)
            return _empty_activation(input), none, none.clone(), empty_act_mask(input)
        stat = _empty_channel_stat
        return _empty_activation(input), stat(input), stat(input), empty_act_mask(input, act_mask_bytes(input, act))

    def fwd_train(input, residual, weight, bias, eps, act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE):
        contract.check_fwd_train(input, residual, weight, bias, eps, act, negative_slope)
        stat = _empty_channel_stat
        mask = empty_act_mask(input, act_mask_bytes(input, act))
        return _empty_activation(input), stat(input), stat(input), stat(input), mask

    def fwd_eval(input, residual, running_mean, running_var, weight, bias, eps, act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE):
        contract.check_fwd_eval(input, residual, running_mean, running_var, weight, bias, eps, act, negative_slope)
        return _empty_activation(input)

    def bwd(grad_out, out, act_mask, input, weight, mean, invstd, batch_stats, residual_grad, residual=None,
            bias=None, act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE):
        contract.check_bwd(grad_out, out, act_mask, input, weight, mean, invstd, act_mask_bytes(input, act), residual,
                           bias, act, negative_slope)
        stat = _empty_channel_stat
        return _empty_activation(input), empty_grad_residual(input, residual_grad), stat(input), stat(input)

    def stats(input):
        contract.check_stats(input)
        return _empty_channel_stat(input), _empty_channel_stat(input)

    def bwd_reduce(grad_out, out, input, mean, invstd, residual=None, weight=None, bias=None, act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE):
        contract.check_bwd_reduce(grad_out, out, input, mean, invstd, residual, weight, bias, act, negative_slope)
        return _empty_channel_stat(input), _empty_channel_stat(input)

    def bwd_apply(grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat, residual_grad, residual=None,
                  bias=None, act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE):
        contract.check_bwd_apply(grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat, residual, bias,
                                 act, negative_slope)
        return _empty_activation(input), empty_grad_residual(input, residual_grad)

    return OpSet(bn_act, fwd_train, fwd_eval, bwd, stats, bwd_reduce, bwd_apply)


# ---------------------------------------------------------------------------------------------
# The autograd formula, written once in Python (the C++ twin: csrc/common/bn_act_autograd.cpp):
# one bn_act_bwd, whose gradients reach input, residual, weight and bias only (the statistics the
# forwards return are not differentiable). It serves bn_act of a Python backend (triton) and
# bn_act_fwd_train of every op set, which nn.BatchNorm's momentum=None path calls under
# torch.compile. No module differentiates through the other ops: bn_act_fwd_eval and SyncBatchNorm's
# pieces run inside SyncBatchNorm's own autograd.Function, so they have no autograd formula.


def _param_grad(grad, param, needed):
    if not needed or param is None:
        return None
    return grad if grad.dtype == param.dtype else grad.to(param.dtype)


def _save(ctx, input, residual, out, act_mask, weight, bias, mean, invstd, act, negative_slope):
    """What the backward of `act` reads, and nothing else of an activation's size: out (and the
    mask) for the piecewise-linear activations, the residual (by reference) where z is recomputed."""
    reads_out = contract.backward_reads_out(act)
    recomputes = contract.backward_recomputes_z(act)
    ctx.save_for_backward(
        input, out if reads_out else None, act_mask, weight, bias, mean, invstd,
        residual if recomputes else None,
    )
    ctx.act, ctx.negative_slope = act, negative_slope
    ctx.has_residual = residual is not None


def _backward(ctx, bwd_op, grad_out, saved, batch_stats):
    """(grad_input, grad_residual, grad_weight, grad_bias) of one bn_act_bwd, None where
    ctx.needs_input_grad (input, residual, weight, bias first) asks for none."""
    input, out, act_mask, weight, bias, mean, invstd, residual = saved
    need_input, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
    with profiled(ctx.has_residual, "bwd", ctx.act):
        grad_input, grad_residual, grad_weight, grad_bias = bwd_op(
            grad_out, out, act_mask, input, weight, mean, invstd, batch_stats, need_residual, residual, bias,
            ctx.act, ctx.negative_slope,
        )
    return (
        grad_input if need_input else None,
        grad_residual if need_residual else None,
        _param_grad(grad_weight, weight, need_weight),
        _param_grad(grad_bias, bias, need_bias),
    )


def _act_args(trailing):
    """(act, negative_slope): a call's trailing arguments, the schema's defaults for those left out."""
    return tuple(trailing) + (DEFAULT_ACT, DEFAULT_NEGATIVE_SLOPE)[len(trailing):]


def _fwd_train_autograd(bwd_op):
    def setup_context(ctx, inputs, output):
        input, residual, weight, bias, _eps, *act = inputs
        out, save_mean, save_invstd, _batch_var, act_mask = output
        _save(ctx, input, residual, out, act_mask, weight, bias, save_mean, save_invstd, *_act_args(act))
        ctx.mark_non_differentiable(*output[1:])

    def backward(ctx, grad_out, _grad_mean, _grad_invstd, _grad_var, _grad_mask):
        return *_backward(ctx, bwd_op, grad_out, ctx.saved_tensors, True), None, None, None

    return backward, setup_context


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "fused_resnet: double backward (a gradient of a gradient through the fused BatchNorm) is "
        "not supported"
    )


def register_op_set(ops: OpSet, act_mask_bytes, with_bn_act_fake=True):
    """Give a compiled backend's ops (OpOverloads or triton_op handles) their fake impls and the
    autograd of _bn_act_fwd_train; bn_act has its autograd where it is defined (C++, or
    `register_bn_act_autograd`); _bn_act_bwd refuses a double backward.

    act_mask_bytes(input, act): the length of the act_mask its bn_act_fwd_train returns for that input
    and activation.
    """
    for op, fake in zip(ops, _fake_ops(act_mask_bytes)):
        if op is not ops.bn_act or with_bn_act_fake:
            torch.library.register_fake(op, fake)
    backward, setup_context = _fwd_train_autograd(ops.bn_act_bwd)
    torch.library.register_autograd(ops.bn_act_fwd_train, backward, setup_context=setup_context)
    torch.library.register_autograd(
        ops.bn_act_bwd, _no_double_backward, setup_context=lambda ctx, inputs, output: None
    )


# ---------------------------------------------------------------------------------------------
# bn_act's autograd in Python, for a backend whose bn_act is defined in Python (triton): the
# twin of csrc/common/bn_act_autograd.cpp. The forward runs the op below autograd (kernels and
# running-statistics update), the backward one bn_act_bwd; the non-differentiable outputs get no
# gradient tensors.


def register_bn_act_autograd(library: torch.library.Library, bn_act_op, bwd_op):
    """Register bn_act's Autograd kernel in `library`, where bn_act_op's schema is defined."""

    class BnActFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, input, residual, weight, bias, running_mean, running_var, training, momentum, eps, act,
                    negative_slope):
            with torch._C._AutoDispatchBelowADInplaceOrView():
                out, mean, invstd, act_mask = bn_act_op(
                    input, residual, weight, bias, running_mean, running_var, training, momentum, eps, act,
                    negative_slope,
                )
            # The statistics the backward uses: the batch's; in eval the running buffers
            # themselves, held as eager's batch norm holds them (no copy and no kernel now, and
            # no version check: a training step that updates them before this backward runs
            # changes its gradient, in eager too).
            _save(ctx, input, residual, out, act_mask, weight, bias, mean, invstd, act, negative_slope)
            ctx.running = None if training else (running_mean, running_var, eps)
            ctx.training = training
            ctx.mark_non_differentiable(mean, invstd, act_mask)
            ctx.set_materialize_grads(False)
            return out, mean, invstd, act_mask

        @staticmethod
        def backward(ctx, grad_out, _grad_mean, _grad_invstd, _grad_mask):
            if grad_out is None or not any(ctx.needs_input_grad[:4]):
                return (None,) * 11
            input, out, act_mask, weight, bias, mean, invstd, residual = ctx.saved_tensors
            if not ctx.training:  # from the running statistics, as csrc/common/bn_act_autograd.cpp
                running_mean, running_var, eps = ctx.running
                acc = acc_dtype(input.dtype)
                mean, invstd = running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps)
            saved = (input, out, act_mask, weight, bias, mean, invstd, residual)
            return (*_backward(ctx, bwd_op, grad_out, saved, ctx.training), *(None,) * 7)

    def bn_act_autograd(input, residual, weight, bias, running_mean, running_var, training, momentum, eps,
                        act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE):
        args = (input, residual, weight, bias, running_mean, running_var, training, momentum, eps, act, negative_slope)
        records = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, residual, weight, bias)
        )
        with profiled(residual is not None, "fwd", act):
            if records:
                result = BnActFunction.apply(*args)
            else:  # inference, no_grad: the op alone, no graph node
                with torch._C._AutoDispatchBelowADInplaceOrView():
                    result = bn_act_op(*args)
        if training and running_mean is not None:  # updated in place, below autograd
            torch.autograd.graph.increment_version(running_mean)
            torch.autograd.graph.increment_version(running_var)
        return tuple(result)

    library.impl("bn_act", bn_act_autograd, "Autograd")
