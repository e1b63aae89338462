"""Launchers of the Triton kernels (kernels.py), registered as the custom ops fused_resnet_triton::*.

Each op has the schema, the checks (fused_resnet/contract.py) and the math of its C++ twin
(csrc/fused_resnet.cpp), and runs under its input's device guard (launch.device_guard). The six
functional ops are defined with `torch.library.triton_op`, so torch.compile traces into the
kernels (launch.Kernel goes through wrap_triton under a tracer); bn_act, which updates the running
statistics in place, is defined from its schema in a torch.library.Library, with a kernel for
each device the backend runs and its autograd from fused_resnet.ops.register_bn_act_autograd.
fused_resnet/backends/triton.py gives the ops their fake impls and autograd (through
fused_resnet.ops.register_op_set) and registers the backend.

Layout: the input is used as it is when it is dense NC* or channels_last, else made contiguous
(contract.canonical_layout); outputs are allocated like that canonical input. Other activations
(residual, grad_out, out) are read in place through their own strides when they fit the input's
3D view with unit (or zero) stride along its fastest dimension, else converted to the input's
memory format first. Per-channel vectors are read through their own stride (any, 0 included).
The view, the reduction plan, tiles and grids: partition.py.
"""

import struct
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor
from torch._library.triton import set_wrap_triton_enabled
from torch.library import triton_op

from .. import contract
from ..contract import DEFAULT_ACT, DEFAULT_NEGATIVE_SLOPE, acc_dtype, canonical_layout
from ..ops import empty_grad_residual, empty_act_mask
from . import launch, partition
from .launch import device_guard

LIBRARY = "fused_resnet_triton"

# Combine kernels: partials merged BLOCK_S splits x BLOCK_C channels at a time.
_COMBINE_META = {"BLOCK_S": 16, "BLOCK_C": 64}

# ---------------------------------------------------------------------------------------------
# Launches.


def _float_bits(value: float) -> int:
    """The 64 bits of float64 `value` as an int: compiled Triton passes a Python float as float32,
    an int64 exactly; the kernels bitcast it back (kernels._float_arg)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


# The momentum argument of a launch that updates no running statistics (unread): one in the
# int64 range every real momentum's bits take, so that it compiles no variant of its own.
_UNUSED_MOMENTUM_BITS = _float_bits(0.5)


def _channel_arg(t: Optional[Tensor], like: Tensor):
    """(pointer, stride) of an optional per-channel vector; `like` stands in, unread, for None."""
    return (t, t.stride(0)) if t is not None else (like, 0)


def _plan_with_partials(x, view, standin):
    """(plan, first, second): the reduction plan of x, and the two [num_splits, C] partials its
    programs write, in standin's dtype (both standin itself, not read, with a single split)."""
    plan = partition.plan_reduction(view, x.device)
    if plan.num_splits == 1:
        return plan, standin, standin
    first, second = (x.new_empty((plan.num_splits, view.C), dtype=standin.dtype) for _ in range(2))
    return plan, first, second


def _running_update_args(running, like):
    """The statistics kernels' running-update arguments, (running_mean, running_var, their
    strides, momentum's bits) and UPDATE_RUNNING, for running = (running_mean, running_var,
    momentum) or None (no update; `like` stands in for the buffers)."""
    if running is None:
        return (like, like, 0, 0, _UNUSED_MOMENTUM_BITS), False
    running_mean, running_var, momentum = running
    return (running_mean, running_var, running_mean.stride(0), running_var.stride(0), _float_bits(momentum)), True


def _launch_batch_stats(x, view, eps, running=None):
    """(mean, var, invstd) of each channel of a non-empty canonical x, accumulation dtype; with
    running = (running_mean, running_var, momentum), the running statistics are updated in the
    kernels' per-channel finalize."""
    acc = acc_dtype(x.dtype)
    c = view.C
    mean, var, invstd = (x.new_empty((c,), dtype=acc) for _ in range(3))
    plan, mean_part, m2_part = _plan_with_partials(x, view, mean)
    single = plan.num_splits == 1
    update_args, update = _running_update_args(running, mean)
    tile = partition.reduce_tile(view, plan, x.device)
    sizes = (view.outer, c, view.inner, plan.chunk_a, plan.chunk_b, plan.splits_b)
    launch.stats(
        (triton.cdiv(c, tile.block_c), plan.num_splits),
        x, *partition.view_strides(x, view),
        mean_part, m2_part, mean, var, invstd, *update_args,
        *sizes, _float_bits(eps),
        SINGLE_SPLIT=single, UPDATE_RUNNING=update and single, **tile.meta,
    )
    if not single:
        launch.stats_combine(
            (triton.cdiv(c, _COMBINE_META["BLOCK_C"]),),
            mean_part, m2_part, mean, var, invstd, *update_args,
            *sizes, plan.num_splits, _float_bits(eps),
            UPDATE_RUNNING=update, **_COMBINE_META,
        )
    return mean, var, invstd


def _fwd_apply_operands(x, view, residual):
    """(y, r, r_strides): the forward apply's output, allocated like x, and the residual as it
    reads it: everything the apply allocates, so that bn_act allocates it before the statistics
    kernel updates the running statistics (a failed allocation then changes no state)."""
    y = torch.empty_like(x)
    if residual is not None:
        return (y,) + partition.operand(residual, x, view)
    return y, x, (0, 0, 0)


def _act_code(act):
    """The kernels' ACT constexpr (kernels.ACT_*): the activation's index in contract.ACTIVATIONS."""
    return contract.ACTIVATIONS.index(act)


def _launch_fwd_apply(x, view, residual, mean, spread, weight, bias, eps, batch_stats, act, negative_slope,
                      operands=None):
    y, r, r_strides = operands if operands is not None else _fwd_apply_operands(x, view, residual)
    args = (
        x, *partition.view_strides(x, view), r, *r_strides, y,
        mean, mean.stride(0), spread, spread.stride(0),
        *_channel_arg(weight, mean), *_channel_arg(bias, mean), _float_bits(eps), _float_bits(negative_slope),
        view.outer, view.C, view.inner,
    )
    flags = dict(
        BATCH_STATS=batch_stats, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, ACT=_act_code(act),
    )

    def run(tile):
        launch.fwd_apply(partition.tile_grid(view, tile), *args, **flags, **tile.meta)

    key = ("fwd_apply", view.C, view.inner, x.dtype, r.dtype, mean.dtype, *flags.values())
    run(partition.apply_tile(view, x.device, key, run))
    return y


def _recompute_operands(x, view, out, residual, act):
    """(y, y_strides, r, r_strides): what a backward kernel reads to find dz: out, or the residual
    to recompute z (x stands in, unread, for the one not read)."""
    if contract.backward_reads_out(act):
        y, y_strides = partition.operand(out, x, view)
    else:
        y, y_strides = x, (0, 0, 0)
    if contract.backward_recomputes_z(act) and residual is not None:
        r, r_strides = partition.operand(residual, x, view)
    else:
        r, r_strides = x, (0, 0, 0)
    return y, y_strides, r, r_strides


def _z_flags(act, residual, weight, bias):
    recompute = contract.backward_recomputes_z(act)
    return dict(
        ACT=_act_code(act), RECOMPUTE_Z=recompute, HAS_BIAS=recompute and bias is not None,
        HAS_RESIDUAL=recompute and residual is not None,
    )


def _launch_bwd_reduce(grad_out, out, x, view, mean, invstd, residual, weight, bias, act, negative_slope):
    """(Σdz·x̂, Σdz) of each channel of a non-empty canonical x, accumulation dtype."""
    acc = acc_dtype(x.dtype)
    c = view.C
    mean, invstd = mean.to(acc), invstd.to(acc)
    dy, dy_strides = partition.operand(grad_out, x, view)
    y, y_strides, r, r_strides = _recompute_operands(x, view, out, residual, act)
    sum_dz, sum_dz_xhat = (x.new_empty((c,), dtype=acc) for _ in range(2))
    plan, sum_dz_part, sum_dz_xmu_part = _plan_with_partials(x, view, sum_dz)
    single = plan.num_splits == 1
    tile = partition.reduce_tile(view, plan, x.device)
    launch.bwd_reduce(
        (triton.cdiv(c, tile.block_c), plan.num_splits),
        dy, *dy_strides,
        y, *y_strides,
        x, *partition.view_strides(x, view),
        r, *r_strides,
        mean, mean.stride(0), invstd, invstd.stride(0),
        *_channel_arg(weight, mean), *_channel_arg(bias, mean), _float_bits(negative_slope),
        sum_dz_part, sum_dz_xmu_part, sum_dz, sum_dz_xhat,
        view.outer, c, view.inner, plan.chunk_a, plan.chunk_b, plan.splits_b,
        SINGLE_SPLIT=single, HAS_WEIGHT=weight is not None, **_z_flags(act, residual, weight, bias), **tile.meta,
    )
    if not single:
        launch.bwd_reduce_combine(
            (triton.cdiv(c, _COMBINE_META["BLOCK_C"]),),
            sum_dz_part, sum_dz_xmu_part, invstd, invstd.stride(0), sum_dz, sum_dz_xhat,
            c, plan.num_splits,
            **_COMBINE_META,
        )
    return sum_dz_xhat, sum_dz


def _launch_bwd_apply(grad_out, out, x, view, weight, mean, invstd, sum_dz, sum_dz_xhat, count,
                      batch_stats, residual_grad, residual, bias, act, negative_slope):
    """(grad_input, grad_residual) of a non-empty canonical x; the means of the backward's sums
    are sum_dz / count and sum_dz_xhat / count (bn_act_bwd_apply, given the means, passes them
    with count 1)."""
    acc = acc_dtype(x.dtype)
    mean, invstd = mean.to(acc), invstd.to(acc)
    sum_dz, sum_dz_xhat = sum_dz.to(acc), sum_dz_xhat.to(acc)
    dy, dy_strides = partition.operand(grad_out, x, view)
    y, y_strides, r, r_strides = _recompute_operands(x, view, out, residual, act)
    grad_input = torch.empty_like(x)
    grad_residual = empty_grad_residual(x, residual_grad)
    args = (
        dy, *dy_strides,
        y, *y_strides,
        x, *partition.view_strides(x, view),
        grad_input, grad_residual if residual_grad else grad_input,
        r, *r_strides,
        *_channel_arg(weight, invstd), mean, mean.stride(0), invstd, invstd.stride(0),
        *_channel_arg(bias, invstd), _float_bits(negative_slope),
        sum_dz, sum_dz.stride(0), sum_dz_xhat, sum_dz_xhat.stride(0), count,
        view.outer, view.C, view.inner,
    )
    flags = dict(BATCH_STATS=batch_stats, HAS_WEIGHT=weight is not None, WRITE_GRAD_RESIDUAL=residual_grad,
                 **_z_flags(act, residual, weight, bias))

    def run(tile):
        launch.bwd_apply(partition.tile_grid(view, tile), *args, **flags, **tile.meta)

    key = ("bwd_apply", view.C, view.inner, x.dtype, dy.dtype, y.dtype, *flags.values())
    run(partition.apply_tile(view, x.device, key, run))
    return grad_input, grad_residual


# ---------------------------------------------------------------------------------------------
# The ops (schemas and math: csrc/fused_resnet.cpp). An empty input launches nothing: its
# statistics are mean 0, var 0, and its reductions 0.


@triton_op(f"{LIBRARY}::_bn_act_fwd_train", mutates_args=())
def bn_act_fwd_train(
    input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
    act: str = DEFAULT_ACT, negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    contract.check_fwd_train(input, residual, weight, bias, eps, act, negative_slope)
    x = canonical_layout(input)
    act_mask = empty_act_mask(x)  # none kept: bn_act_bwd reads out
    if x.numel() == 0:
        var = x.new_zeros((x.shape[1],), dtype=acc_dtype(x.dtype))
        return torch.empty_like(x), torch.zeros_like(var), torch.rsqrt(var + eps), var, act_mask
    view = partition.view_of(x)
    with device_guard(x.device):
        mean, var, invstd = _launch_batch_stats(x, view, eps)
        out = _launch_fwd_apply(x, view, residual, mean, invstd, weight, bias, eps, True, act, negative_slope)
    return out, mean, invstd, var, act_mask


@triton_op(f"{LIBRARY}::_bn_act_fwd_eval", mutates_args=())
def bn_act_fwd_eval(
    input: Tensor,
    residual: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    act: str = DEFAULT_ACT,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> Tensor:
    contract.check_fwd_eval(input, residual, running_mean, running_var, weight, bias, eps, act, negative_slope)
    x = canonical_layout(input)
    if x.numel() == 0:
        return torch.empty_like(x)
    with device_guard(x.device):
        return _launch_fwd_apply(
            x, partition.view_of(x), residual, running_mean, running_var, weight, bias, eps, False, act, negative_slope
        )


@triton_op(f"{LIBRARY}::_bn_act_bwd", mutates_args=())
def bn_act_bwd(
    grad_out: Tensor,
    out: Optional[Tensor],
    act_mask: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    batch_stats: bool,
    residual_grad: bool,
    residual: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    act: str = DEFAULT_ACT,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    contract.check_bwd(grad_out, out, act_mask, input, weight, mean, invstd, 0, residual, bias, act,
                       negative_slope)  # no mask kept
    x = canonical_layout(input)
    if x.numel() == 0:
        sum_dz = x.new_zeros((x.shape[1],), dtype=acc_dtype(x.dtype))
        return torch.empty_like(x), empty_grad_residual(x, residual_grad), torch.zeros_like(sum_dz), sum_dz
    view = partition.view_of(x)
    with device_guard(x.device):
        sum_dz_xhat, sum_dz = _launch_bwd_reduce(
            grad_out, out, x, view, mean, invstd, residual, weight, bias, act, negative_slope
        )
        grad_input, grad_residual = _launch_bwd_apply(
            grad_out, out, x, view, weight, mean, invstd, sum_dz, sum_dz_xhat, view.M,
            batch_stats, residual_grad, residual, bias, act, negative_slope,
        )
    return grad_input, grad_residual, sum_dz_xhat, sum_dz


@triton_op(f"{LIBRARY}::_bn_stats", mutates_args=())
def bn_stats(input: Tensor) -> Tuple[Tensor, Tensor]:
    contract.check_stats(input)
    x = canonical_layout(input)
    if x.numel() == 0:
        var = x.new_zeros((x.shape[1],), dtype=acc_dtype(x.dtype))
        return torch.zeros_like(var), var
    # invstd is computed on the way and dropped; any eps > 0 keeps it finite
    with device_guard(x.device):
        mean, var, _invstd = _launch_batch_stats(x, partition.view_of(x), 1.0)
    return mean, var


@triton_op(f"{LIBRARY}::_bn_act_bwd_reduce", mutates_args=())
def bn_act_bwd_reduce(
    grad_out: Tensor, out: Optional[Tensor], input: Tensor, mean: Tensor, invstd: Tensor,
    residual: Optional[Tensor] = None, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
    act: str = DEFAULT_ACT, negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> Tuple[Tensor, Tensor]:
    contract.check_bwd_reduce(grad_out, out, input, mean, invstd, residual, weight, bias, act, negative_slope)
    x = canonical_layout(input)
    if x.numel() == 0:
        sum_dz = x.new_zeros((x.shape[1],), dtype=acc_dtype(x.dtype))
        return torch.zeros_like(sum_dz), sum_dz
    with device_guard(x.device):
        return _launch_bwd_reduce(
            grad_out, out, x, partition.view_of(x), mean, invstd, residual, weight, bias, act, negative_slope
        )


@triton_op(f"{LIBRARY}::_bn_act_bwd_apply", mutates_args=())
def bn_act_bwd_apply(
    grad_out: Tensor,
    out: Optional[Tensor],
    input: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    mean_dz: Tensor,
    mean_dz_xhat: Tensor,
    residual_grad: bool,
    residual: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    act: str = DEFAULT_ACT,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> Tuple[Tensor, Tensor]:
    contract.check_bwd_apply(grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat, residual, bias, act,
                             negative_slope)
    x = canonical_layout(input)
    if x.numel() == 0:
        return torch.empty_like(x), empty_grad_residual(x, residual_grad)
    with device_guard(x.device):
        return _launch_bwd_apply(
            grad_out, out, x, partition.view_of(x), weight, mean, invstd, mean_dz, mean_dz_xhat, 1,
            True, residual_grad, residual, bias, act, negative_slope,
        )


# ---------------------------------------------------------------------------------------------
# bn_act: the schema of csrc/fused_resnet.cpp, in this library.

BN_ACT_SCHEMA = (
    "bn_act(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias,"
    " Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum,"
    " float eps, str act=\"relu\", float negative_slope=0.01)"
    " -> (Tensor out, Tensor save_mean, Tensor save_invstd, Tensor act_mask)"
)
library = torch.library.Library(LIBRARY, "FRAGMENT")
# any layout in, outputs like the canonical input (csrc/fused_resnet.cpp's kAnyLayout)
library.define(BN_ACT_SCHEMA, tags=(torch.Tag.flexible_layout,))


def bn_act_kernel(input, residual, weight, bias, running_mean, running_var, training, momentum, eps,
                  act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE):
    """One module call: the training forward with the running statistics updated in the
    statistics kernels' finalize, or the eval forward (csrc/fused_resnet.cpp).

    It is a device kernel, so it only ever sees real tensors (torch.compile sees bn_act through its
    fake impl): its launches go straight to the kernels, as triton_op's own device kernels do,
    rather than through wrap_triton's higher-order-op dispatch, which costs host time each launch."""
    with set_wrap_triton_enabled(False), device_guard(input.device):
        return _bn_act(input, residual, weight, bias, running_mean, running_var, training, momentum, eps, act,
                       negative_slope)


def _bn_act(input, residual, weight, bias, running_mean, running_var, training, momentum, eps, act, negative_slope):
    contract.check_bn_act(input, residual, weight, bias, running_mean, running_var, training, eps, act, negative_slope)
    x = canonical_layout(input)
    act_mask = empty_act_mask(x)  # none kept: bn_act_bwd reads out
    acc = acc_dtype(x.dtype)
    if not training:  # no batch statistics: two empty ones (outputs of an op never alias)
        no_mean, no_invstd = x.new_empty((0,), dtype=acc), x.new_empty((0,), dtype=acc)
        if x.numel() == 0:
            return torch.empty_like(x), no_mean, no_invstd, act_mask
        out = _launch_fwd_apply(
            x, partition.view_of(x), residual, running_mean, running_var, weight, bias, eps, False, act, negative_slope
        )
        return out, no_mean, no_invstd, act_mask
    if x.numel() == 0:  # an empty batch updates nothing
        var = x.new_zeros((x.shape[1],), dtype=acc)
        return torch.empty_like(x), torch.zeros_like(var), torch.rsqrt(var + eps), act_mask
    view = partition.view_of(x)
    running = (running_mean, running_var, momentum) if running_mean is not None else None
    operands = _fwd_apply_operands(x, view, residual)  # before the running statistics change
    mean, _var, invstd = _launch_batch_stats(x, view, eps, running)
    out = _launch_fwd_apply(x, view, residual, mean, invstd, weight, bias, eps, True, act, negative_slope,
                            operands=operands)
    return out, mean, invstd, act_mask


def _register_bn_act(device_types):
    for device_type in device_types:
        library.impl("bn_act", bn_act_kernel, device_type.upper())
    return getattr(torch.ops, LIBRARY).bn_act.default


def op_set(device_types) -> contract.OpSet:
    """The backend's ops, bn_act with kernels for `device_types`."""
    return contract.OpSet(
        _register_bn_act(device_types), bn_act_fwd_train, bn_act_fwd_eval, bn_act_bwd, bn_stats,
        bn_act_bwd_reduce, bn_act_bwd_apply,
    )
