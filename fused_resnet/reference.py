"""The op contract written as an eager composition of torch ops: the fallback backend "reference".

Same signatures, checks (contract.py) and results as the ops of torch.ops.fused_resnet (see
csrc/fused_resnet.cpp for the math). Autograd comes from the eager ops themselves. It makes
several passes over memory and is there for correctness on any device, not for speed.

`update_running_stats` is nn.BatchNorm's running-statistics update in Python, for this backend's
bn_act and for SyncBatchNorm (whose batch statistics are merged across processes); the kernels
apply the same update in their per-channel finalize (csrc/common/running_stats.h).
"""

import torch
import torch.nn.functional as F

from . import contract
from .contract import DEFAULT_ACT, DEFAULT_NEGATIVE_SLOPE, acc_dtype
from .trace_names import profiled


def _per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def activation(z, act, negative_slope):
    """out = act(z) (docs/design.md, "Activations"), as eager's own functions compute it."""
    if act == "relu":
        return torch.relu(z)
    if act == "relu6":
        return F.hardtanh(z, 0.0, 6.0)
    if act == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if act == "identity":
        return z
    if act == "silu":
        return F.silu(z)
    if act == "hardswish":
        return F.hardswish(z)
    return F.gelu(z, approximate="tanh" if act == "gelu_tanh" else "none")


def activation_grad(grad, out, z, act, negative_slope):
    """dz = grad · d out / dz, from out for the piecewise-linear activations (eager's backward
    formulas written on out, which tells the same side: a NaN passes as eager's passes it), from
    z for the smooth ones (eager's own backward ops)."""
    zero = torch.zeros_like(grad)
    if act == "relu":
        return torch.where(out <= 0, zero, grad)
    if act == "relu6":
        return torch.where((out <= 0) | (out >= 6), zero, grad)
    if act == "leaky_relu":
        return torch.where(out > 0, grad, grad * negative_slope)
    if act == "identity":
        return grad
    if act == "silu":
        return torch.ops.aten.silu_backward(grad, z)
    if act == "hardswish":
        return torch.ops.aten.hardswish_backward(grad, z)
    return torch.ops.aten.gelu_backward(grad, z, approximate="tanh" if act == "gelu_tanh" else "none")


def _pre_activation(x_hat, residual, weight, bias):
    """z = x̂·w + b (+ r) in x_hat's (the accumulation) dtype."""
    acc = x_hat.dtype
    z = x_hat
    if weight is not None:
        z = z * _per_channel(weight.to(acc), z.dim())
    if bias is not None:
        z = z + _per_channel(bias.to(acc), z.dim())
    if residual is not None:
        z = z + residual.to(acc)
    return z


def _affine_residual_act(x_hat, residual, weight, bias, out_dtype, act, negative_slope):
    return activation(_pre_activation(x_hat, residual, weight, bias), act, negative_slope).to(out_dtype)


def eval_stats(input, running_mean, running_var, eps):
    """(mean, invstd) of the running statistics in the accumulation dtype, copied: what the
    backward of an eval forward uses, taken when the forward runs."""
    acc = acc_dtype(input.dtype)
    return running_mean.to(acc, copy=True), torch.rsqrt(running_var.to(acc, copy=True).add_(eps))


def _blend_into(buffer, batch_value, momentum, scale=1.0):
    """buffer <- (1 - momentum) * buffer + momentum * scale * batch_value, in batch_value's dtype;
    momentum a float, or a 0-d tensor (the cumulative average under torch.compile)."""
    value = buffer.to(batch_value.dtype)  # the buffer itself when it already has that dtype
    if isinstance(momentum, torch.Tensor):
        value.mul_(1.0 - momentum).add_(batch_value * (momentum * scale))
    else:
        value.mul_(1.0 - momentum).add_(batch_value, alpha=momentum * scale)
    if buffer.dtype != batch_value.dtype:
        buffer.copy_(value)


@torch.no_grad()
def update_running_stats(running_mean, running_var, batch_mean, batch_var, count, momentum):
    """nn.BatchNorm's update:

    running_mean <- (1 - momentum) * running_mean + momentum * batch_mean
    running_var  <- (1 - momentum) * running_var  + momentum * batch_var * count / (count - 1)

    computed in the accumulation dtype (the batch statistics'), in place. An empty batch leaves
    both untouched, as eager does.
    """
    if count == 0:
        return
    _blend_into(running_mean, batch_mean, momentum)
    _blend_into(running_var, batch_var, momentum, scale=count / (count - 1))


def bn_act(input, residual, weight, bias, running_mean, running_var, training, momentum, eps,
           act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE):
    contract.check_bn_act(input, residual, weight, bias, running_mean, running_var, training, eps, act, negative_slope)
    with profiled(residual is not None, "fwd", act):
        return _bn_act(input, residual, weight, bias, running_mean, running_var, training, momentum, eps,
                       act, negative_slope)


def _bn_act(input, residual, weight, bias, running_mean, running_var, training, momentum, eps, act,
            negative_slope):
    act_mask = input.new_empty((0,), dtype=torch.uint8)
    if not training:
        out = _fwd_eval(input, residual, running_mean, running_var, weight, bias, eps, act, negative_slope)
        none = input.new_empty((0,), dtype=acc_dtype(input.dtype))
        return out, none, none.clone(), act_mask
    out, mean, invstd, var, act_mask = _fwd_train(input, residual, weight, bias, eps, act, negative_slope)
    if running_mean is not None:
        count = input.numel() // input.shape[1] if input.shape[1] else 0
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return out, mean, invstd, act_mask


def bn_act_fwd_train(input, residual, weight, bias, eps, act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE):
    contract.check_fwd_train(input, residual, weight, bias, eps, act, negative_slope)
    return _fwd_train(input, residual, weight, bias, eps, act, negative_slope)


def _fwd_train(input, residual, weight, bias, eps, act, negative_slope):
    acc = acc_dtype(input.dtype)
    x = input.to(acc)
    channels = input.shape[1]
    reduce_dims = [0] + list(range(2, input.dim()))
    if input.numel() == 0:
        # Empty batch: the kernels' convention, mean 0 and var 0.
        mean = x.new_zeros(channels)
        var = x.new_zeros(channels)
    else:
        var, mean = torch.var_mean(x, dim=reduce_dims, correction=0)
    invstd = torch.rsqrt(var + eps)
    x_hat = (x - _per_channel(mean, x.dim())) * _per_channel(invstd, x.dim())
    out = _affine_residual_act(x_hat, residual, weight, bias, input.dtype, act, negative_slope)
    # no mask: eager autograd keeps what the activation's backward needs
    act_mask = input.new_empty((0,), dtype=torch.uint8)
    return out, mean.detach(), invstd.detach(), var.detach(), act_mask


def bn_act_fwd_eval(input, residual, running_mean, running_var, weight, bias, eps, act=DEFAULT_ACT,
                    negative_slope=DEFAULT_NEGATIVE_SLOPE):
    contract.check_fwd_eval(input, residual, running_mean, running_var, weight, bias, eps, act, negative_slope)
    return _fwd_eval(input, residual, running_mean, running_var, weight, bias, eps, act, negative_slope)


def _fwd_eval(input, residual, running_mean, running_var, weight, bias, eps, act, negative_slope):
    acc = acc_dtype(input.dtype)
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    x_hat = (input.to(acc) - _per_channel(running_mean.to(acc), input.dim())) * _per_channel(
        invstd, input.dim()
    )
    return _affine_residual_act(x_hat, residual, weight, bias, input.dtype, act, negative_slope)


# The pieces of the training ops, used by SyncBatchNorm (schemas in csrc/fused_resnet.cpp).


def _reduce_dims(input):
    return [0] + list(range(2, input.dim()))


class _Backward:
    """What a backward op is given beside grad_out and the statistics: out (piecewise-linear
    activations), and what recomputes z (the smooth ones): input, residual, weight, bias."""

    def __init__(self, out, input, residual, weight, bias, mean, invstd, act, negative_slope):
        self.out, self.input, self.residual, self.weight, self.bias = out, input, residual, weight, bias
        self.mean, self.invstd, self.act, self.negative_slope = mean, invstd, act, negative_slope

    def dz_and_x_hat(self, grad_out):
        acc = acc_dtype(self.input.dtype)
        ndim = self.input.dim()
        x_hat = (self.input.to(acc) - _per_channel(self.mean.to(acc), ndim)) * _per_channel(self.invstd.to(acc), ndim)
        z = None
        if contract.backward_recomputes_z(self.act):
            z = _pre_activation(x_hat, self.residual, self.weight, self.bias)
        # piecewise-linear: compared on out in its own dtype, as eager's backward compares its input
        dz = activation_grad(grad_out.to(acc), self.out, z, self.act, self.negative_slope)
        return dz, x_hat


def bn_act_bwd(grad_out, out, act_mask, input, weight, mean, invstd, batch_stats, residual_grad, residual=None,
               bias=None, act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE):
    """The backward as the kernels compute it (the reference backend's own forwards need none:
    eager autograd differentiates them)."""
    contract.check_bwd(grad_out, out, act_mask, input, weight, mean, invstd, 0, residual, bias, act, negative_slope)
    saved = _Backward(out, input, residual, weight, bias, mean, invstd, act, negative_slope)
    sum_dz_xhat, sum_dz = _bwd_reduce(grad_out, saved)
    count = input.numel() // input.shape[1] if input.shape[1] else 0
    if batch_stats and count > 0:
        mean_dz, mean_dz_xhat = sum_dz / count, sum_dz_xhat / count
    else:
        mean_dz, mean_dz_xhat = torch.zeros_like(sum_dz), torch.zeros_like(sum_dz)
    grad_input, grad_residual = _bwd_apply(grad_out, saved, mean_dz, mean_dz_xhat, residual_grad)
    return grad_input, grad_residual, sum_dz_xhat, sum_dz


def bn_stats(input):
    contract.check_stats(input)
    acc = acc_dtype(input.dtype)
    if input.numel() == 0:
        zeros = input.new_zeros(input.shape[1], dtype=acc)
        return zeros, zeros.clone()
    var, mean = torch.var_mean(input.to(acc), dim=_reduce_dims(input), correction=0)
    return mean, var


def bn_act_bwd_reduce(grad_out, out, input, mean, invstd, residual=None, weight=None, bias=None, act=DEFAULT_ACT,
                      negative_slope=DEFAULT_NEGATIVE_SLOPE):
    contract.check_bwd_reduce(grad_out, out, input, mean, invstd, residual, weight, bias, act, negative_slope)
    return _bwd_reduce(grad_out, _Backward(out, input, residual, weight, bias, mean, invstd, act, negative_slope))


def _bwd_reduce(grad_out, saved):
    dz, x_hat = saved.dz_and_x_hat(grad_out)
    dims = _reduce_dims(saved.input)
    return (dz * x_hat).sum(dims), dz.sum(dims)


def bn_act_bwd_apply(grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat, residual_grad, residual=None,
                     bias=None, act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE):
    contract.check_bwd_apply(grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat, residual, bias, act,
                             negative_slope)
    saved = _Backward(out, input, residual, weight, bias, mean, invstd, act, negative_slope)
    return _bwd_apply(grad_out, saved, mean_dz, mean_dz_xhat, residual_grad)


def _bwd_apply(grad_out, saved, mean_dz, mean_dz_xhat, residual_grad):
    dz, x_hat = saved.dz_and_x_hat(grad_out)
    input, weight, invstd = saved.input, saved.weight, saved.invstd
    ndim = input.dim()
    scale = invstd.to(dz.dtype) if weight is None else invstd.to(dz.dtype) * weight.to(dz.dtype)
    grad_input = (dz - _per_channel(mean_dz.to(dz.dtype), ndim) - x_hat * _per_channel(
        mean_dz_xhat.to(dz.dtype), ndim
    )) * _per_channel(scale, ndim)
    grad_residual = dz.to(input.dtype) if residual_grad else input.new_empty((0,))
    return grad_input.to(input.dtype), grad_residual


OPS = contract.OpSet(
    bn_act, bn_act_fwd_train, bn_act_fwd_eval, bn_act_bwd, bn_stats, bn_act_bwd_reduce, bn_act_bwd_apply
)
