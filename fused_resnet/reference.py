"""The op contract written as an eager composition of torch ops: the fallback backend "reference".

Same signatures, checks (contract.py) and results as the ops of torch.ops.fused_resnet (see
csrc/fused_resnet.cpp for the math). Autograd comes from the eager ops themselves. It makes
several passes over memory and is there for correctness on any device, not for speed.

`update_running_stats` is nn.BatchNorm's running-statistics update in Python, for this backend's
bn_act and for SyncBatchNorm (whose batch statistics are merged across processes); the kernels
apply the same update in their per-channel finalize (csrc/common/running_stats.h).
"""

import torch

from . import contract
from .contract import acc_dtype
from .trace_names import profiled


def _per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((1, -1) + (1,) * (ndim - 2))


def _affine_residual_relu(x_hat, residual, weight, bias, out_dtype):
    acc = x_hat.dtype
    z = x_hat
    if weight is not None:
        z = z * _per_channel(weight.to(acc), z.dim())
    if bias is not None:
        z = z + _per_channel(bias.to(acc), z.dim())
    if residual is not None:
        z = z + residual.to(acc)
    return torch.relu(z).to(out_dtype)


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


def bn_act(input, residual, weight, bias, running_mean, running_var, training, momentum, eps):
    contract.check_bn_act(input, residual, weight, bias, running_mean, running_var, training)
    with profiled(residual is not None, "fwd"):
        return _bn_act(input, residual, weight, bias, running_mean, running_var, training, momentum, eps)


def _bn_act(input, residual, weight, bias, running_mean, running_var, training, momentum, eps):
    relu_mask = input.new_empty((0,), dtype=torch.uint8)
    if not training:
        out = _fwd_eval(input, residual, running_mean, running_var, weight, bias, eps)
        none = input.new_empty((0,), dtype=acc_dtype(input.dtype))
        return out, none, none.clone(), relu_mask
    out, mean, invstd, var, relu_mask = _fwd_train(input, residual, weight, bias, eps)
    if running_mean is not None:
        count = input.numel() // input.shape[1] if input.shape[1] else 0
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return out, mean, invstd, relu_mask


def bn_act_fwd_train(input, residual, weight, bias, eps):
    contract.check_fwd_train(input, residual, weight, bias)
    return _fwd_train(input, residual, weight, bias, eps)


def _fwd_train(input, residual, weight, bias, eps):
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
    out = _affine_residual_relu(x_hat, residual, weight, bias, input.dtype)
    # no relu_mask: eager autograd keeps what relu's backward needs
    relu_mask = input.new_empty((0,), dtype=torch.uint8)
    return out, mean.detach(), invstd.detach(), var.detach(), relu_mask


def bn_act_fwd_eval(input, residual, running_mean, running_var, weight, bias, eps):
    contract.check_fwd_eval(input, residual, running_mean, running_var, weight, bias)
    return _fwd_eval(input, residual, running_mean, running_var, weight, bias, eps)


def _fwd_eval(input, residual, running_mean, running_var, weight, bias, eps):
    acc = acc_dtype(input.dtype)
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    x_hat = (input.to(acc) - _per_channel(running_mean.to(acc), input.dim())) * _per_channel(
        invstd, input.dim()
    )
    return _affine_residual_relu(x_hat, residual, weight, bias, input.dtype)


# The pieces of the training ops, used by SyncBatchNorm (schemas in csrc/fused_resnet.cpp).


def _reduce_dims(input):
    return [0] + list(range(2, input.dim()))


def bn_act_bwd(grad_out, out, relu_mask, input, weight, mean, invstd, batch_stats, residual_grad):
    """The backward as the kernels compute it (the reference backend's own forwards need none:
    eager autograd differentiates them)."""
    contract.check_bwd(grad_out, out, relu_mask, input, weight, mean, invstd, 0)
    sum_dz_xhat, sum_dz = _bwd_reduce(grad_out, out, input, mean, invstd)
    count = input.numel() // input.shape[1] if input.shape[1] else 0
    if batch_stats and count > 0:
        mean_dz, mean_dz_xhat = sum_dz / count, sum_dz_xhat / count
    else:
        mean_dz, mean_dz_xhat = torch.zeros_like(sum_dz), torch.zeros_like(sum_dz)
    grad_input, grad_residual = _bwd_apply(
        grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat, residual_grad
    )
    return grad_input, grad_residual, sum_dz_xhat, sum_dz


def bn_stats(input):
    contract.check_stats(input)
    acc = acc_dtype(input.dtype)
    if input.numel() == 0:
        zeros = input.new_zeros(input.shape[1], dtype=acc)
        return zeros, zeros.clone()
    var, mean = torch.var_mean(input.to(acc), dim=_reduce_dims(input), correction=0)
    return mean, var


def _masked_grad_and_x_hat(grad_out, out, input, mean, invstd):
    # dz = 0 where out <= 0, else grad_out (NaN in out passes the gradient, as threshold_backward).
    acc = acc_dtype(input.dtype)
    dz = torch.where(out <= 0, torch.zeros_like(grad_out), grad_out).to(acc)
    x_hat = (input.to(acc) - _per_channel(mean.to(acc), input.dim())) * _per_channel(
        invstd.to(acc), input.dim()
    )
    return dz, x_hat


def bn_act_bwd_reduce(grad_out, out, input, mean, invstd):
    contract.check_bwd_reduce(grad_out, out, input, mean, invstd)
    return _bwd_reduce(grad_out, out, input, mean, invstd)


def _bwd_reduce(grad_out, out, input, mean, invstd):
    dz, x_hat = _masked_grad_and_x_hat(grad_out, out, input, mean, invstd)
    dims = _reduce_dims(input)
    return (dz * x_hat).sum(dims), dz.sum(dims)


def bn_act_bwd_apply(grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat, residual_grad):
    contract.check_bwd_apply(grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat)
    return _bwd_apply(grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat, residual_grad)


def _bwd_apply(grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat, residual_grad):
    dz, x_hat = _masked_grad_and_x_hat(grad_out, out, input, mean, invstd)
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
