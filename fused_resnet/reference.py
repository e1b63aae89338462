"""The op contract written as an eager composition of torch ops: the fallback backend "reference".

Same signatures and results as torch.ops.fused_resnet.bn_act_fwd_train / bn_act_fwd_eval and the
SyncBatchNorm pieces bn_stats / bn_act_bwd_reduce / bn_act_bwd_apply (see csrc/fused_resnet.cpp for
the math). Autograd of the two forwards comes from the eager ops themselves. It makes several
passes over memory and is there for correctness on any device, not for speed.
"""

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the fused ops: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def bn_act_fwd_train(input, residual, weight, bias, eps):
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
    acc = acc_dtype(input.dtype)
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    x_hat = (input.to(acc) - _per_channel(running_mean.to(acc), input.dim())) * _per_channel(
        invstd, input.dim()
    )
    return _affine_residual_relu(x_hat, residual, weight, bias, input.dtype)


# The pieces of the training ops, used by SyncBatchNorm (schemas in csrc/fused_resnet.cpp).


def _reduce_dims(input):
    return [0] + list(range(2, input.dim()))


def bn_stats(input):
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
    dz, x_hat = _masked_grad_and_x_hat(grad_out, out, input, mean, invstd)
    dims = _reduce_dims(input)
    return (dz * x_hat).sum(dims), dz.sum(dims)


def bn_act_bwd_apply(grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat, residual_grad):
    dz, x_hat = _masked_grad_and_x_hat(grad_out, out, input, mean, invstd)
    ndim = input.dim()
    scale = invstd.to(dz.dtype) if weight is None else invstd.to(dz.dtype) * weight.to(dz.dtype)
    grad_input = (dz - _per_channel(mean_dz.to(dz.dtype), ndim) - x_hat * _per_channel(
        mean_dz_xhat.to(dz.dtype), ndim
    )) * _per_channel(scale, ndim)
    grad_residual = dz.to(input.dtype) if residual_grad else input.new_empty((0,))
    return grad_input.to(input.dtype), grad_residual
