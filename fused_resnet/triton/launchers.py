"""Launchers of the Triton kernels (kernels.py), registered as the custom ops fused_resnet_triton::*.

Each op has the schema, the checks (fused_resnet/contract.py) and the math of its C++ twin
(csrc/fused_resnet.cpp). The six functional ops are defined with `torch.library.triton_op` and
launch through `wrap_triton`, so torch.compile traces into the kernels; bn_act, which updates the
running statistics in place, is defined from its schema in a torch.library.Library, with a kernel
for each device the backend runs and its autograd from fused_resnet.ops.register_bn_act_autograd.
fused_resnet/triton/__init__.py gives the ops their fake impls and autograd (through
fused_resnet.ops.register_op_set) and registers the backend.

Layout: the input is used as it is when it is dense NC* or channels_last, else made contiguous
(contract.canonical_layout); outputs are allocated like that canonical input. Other activations
(residual, grad_out, out) are read in place through their own strides when they fit the input's
3D view with unit (or zero) stride along its fastest dimension, else converted to the input's
memory format first.
"""

import functools
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor
from torch._library.triton import set_wrap_triton_enabled
from torch.library import triton_op, wrap_triton

from .. import contract
from ..contract import canonical_layout
from ..ops import empty_grad_residual, empty_relu_mask
from ..reference import acc_dtype
from . import interpreter_enabled, kernels

LIBRARY = "fused_resnet_triton"

# Combine kernels: partials merged BLOCK_S splits x BLOCK_C channels at a time.
_COMBINE_BLOCK_S = 16
_COMBINE_BLOCK_C = 64


# Whether kernels.py's kernels run on the interpreter: @triton.jit decides it (TRITON_INTERPRET)
# when it decorates them, at import, so it is read once here rather than at every launch.
_KERNELS_INTERPRETED = interpreter_enabled()


def _launchable(kernel):
    """`kernel` as triton_op launches it: through wrap_triton, so torch.compile traces into it.

    Under the interpreter @triton.jit gives an InterpretedFunction (inside an Autotuner when the
    kernel is autotuned). It is launched directly: torch 2.14's wrap_triton hands such kernels back
    as they are, earlier releases wrap them and then fail looking for the JIT metadata; and the
    interpreter only runs CPU tensors, which inductor does not give to Triton."""
    return kernel if _KERNELS_INTERPRETED else wrap_triton(kernel)


# ---------------------------------------------------------------------------------------------
# The view (docs/design.md) as the kernels see it (kernels.py): [n_outer, n_channels, n_inner],
# the planes layout as [N, C, S], the rows layout as [N*S, C, 1].


@dataclass(frozen=True)
class View:
    n_outer: int  # N, or N*S for channels_last
    n_channels: int
    n_inner: int  # S, or 1 for channels_last (and for 2D inputs)
    channels_last: bool  # the input is channels_last(_3d): its tensors are viewed through movedim

    @property
    def per_channel(self) -> int:
        """M: values per channel."""
        return self.n_outer * self.n_inner


def view_of(x: Tensor) -> View:
    """The view of a canonical (contract.canonical_layout), non-empty input."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    if x.dim() > 2 and not x.is_contiguous():  # canonical and not contiguous: channels_last
        view = View(n * s, c, 1, True)
    else:
        view = View(n, c, s, False)
    if max(view.n_outer, view.n_inner) >= 2**31:
        raise RuntimeError(
            f"fused_resnet triton backend: input of shape {tuple(x.shape)} has {view.per_channel} "
            "values per channel; the kernels index one channel's values with 32-bit integers"
        )
    return view


def _memory_format(x: Tensor, view: View):
    if not view.channels_last:
        return torch.contiguous_format
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def _view_strides(t: Tensor, view: View):
    """Strides of t seen as [n_outer, n_channels, n_inner], or None if t cannot be seen so."""
    try:
        if view.channels_last:
            return t.movedim(1, -1).view(view.n_outer, view.n_channels, 1).stride()
        return t.view(view.n_outer, view.n_channels, view.n_inner).stride()
    except RuntimeError:  # dimensions that do not merge into one (a strided slice)
        return None


def _operand(t: Tensor, x: Tensor, view: View):
    """(tensor, strides) to read t with: t itself when it fits the view of x with unit or zero
    stride along the fastest dimension (coalesced or broadcast loads), else t in x's format."""
    strides = _view_strides(t, view)
    fastest = 1 if view.n_inner == 1 else 2
    if strides is None or strides[fastest] not in (0, 1):
        t = t.contiguous(memory_format=_memory_format(x, view))
        strides = _view_strides(t, view)
    return t, strides


# ---------------------------------------------------------------------------------------------
# Launch plan of the split reductions.

_MAX_SPLITS = 1024


@dataclass(frozen=True)
class ReductionPlan:
    """The reduction over (n_outer, n_inner) split into splits_a x splits_b rectangles of
    chunk_a x chunk_b values per channel; one program per (channel block, rectangle)."""

    chunk_a: int
    chunk_b: int
    splits_a: int
    splits_b: int

    @property
    def num_splits(self) -> int:
        return self.splits_a * self.splits_b


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _parallelism(device: torch.device):
    """(programs to aim for, least values one program should reduce) on `device`.

    On a GPU: 4 programs per SM, and at least 32K values per program (a few microseconds of
    memory traffic, so the partials and the combine cost little). Under the interpreter: small
    numbers, so that the tests' small shapes really split.
    """
    if device.type == "cuda" and not interpreter_enabled():
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()), 32768
    return 8, 256


def _round_up(value: int, multiple: int) -> int:
    return triton.cdiv(value, multiple) * multiple


def plan_reduction(view: View, device: torch.device) -> ReductionPlan:
    """Split a channel's values until the grid has about the target number of programs, as long
    as each program keeps at least the minimum work. Splits go along n_outer first (whole rows of
    n_inner values), then along n_inner when there are fewer rows than splits."""
    target_programs, min_work = _parallelism(device)
    channels_per_program = 1 if view.n_inner > 1 else min(view.n_channels, 64)
    channel_programs = triton.cdiv(view.n_channels, channels_per_program)
    splits = min(
        triton.cdiv(target_programs, channel_programs),
        view.per_channel * channels_per_program // min_work,
        _MAX_SPLITS,
    )
    splits = max(splits, 1)
    if view.n_outer >= splits or view.n_inner == 1:
        row_align = 16 if view.n_inner == 1 else 1
        chunk_a = min(_round_up(triton.cdiv(view.n_outer, splits), row_align), view.n_outer)
        return ReductionPlan(chunk_a, view.n_inner, triton.cdiv(view.n_outer, chunk_a), 1)
    chunk_b = min(_round_up(triton.cdiv(view.n_inner, triton.cdiv(splits, view.n_outer)), 64), view.n_inner)
    return ReductionPlan(1, chunk_b, view.n_outer, triton.cdiv(view.n_inner, chunk_b))


def reduction_plan(input: Tensor) -> ReductionPlan:
    """The plan the statistics and backward reductions use for `input` (non-empty)."""
    return plan_reduction(view_of(canonical_layout(input)), input.device)


# ---------------------------------------------------------------------------------------------
# Launches.


def _tile_grid(view: View):
    def grid(meta):
        return (
            triton.cdiv(view.n_outer, meta["BLOCK_A"])
            * triton.cdiv(view.n_channels, meta["BLOCK_C"])
            * triton.cdiv(view.n_inner, meta["BLOCK_B"]),
        )

    return grid


def _split_grid(view: View, plan: ReductionPlan):
    def grid(meta):
        return (triton.cdiv(view.n_channels, meta["BLOCK_C"]), plan.num_splits)

    return grid


def _plan_with_partials(x, view, standin):
    """(plan, first, second): the reduction plan of x, and the two [num_splits, C] partials its
    programs write, in standin's dtype (both standin itself, not read, with a single split)."""
    plan = plan_reduction(view, x.device)
    if plan.num_splits == 1:
        return plan, standin, standin
    first, second = (x.new_empty((plan.num_splits, view.n_channels), dtype=standin.dtype) for _ in range(2))
    return plan, first, second


def _running_update_args(running, like):
    """The statistics kernels' running-update arguments, (running_mean, running_var, their
    strides, momentum as float32 hi + lo) and UPDATE_RUNNING, for running = (running_mean,
    running_var, momentum) or None (no update; `like` stands in for the buffers)."""
    if running is None:
        return (like, like, 1, 1, 0.0, 0.0), False
    running_mean, running_var, momentum = running
    momentum_hi = struct.unpack("f", struct.pack("f", momentum))[0]  # momentum rounded to float32
    args = (running_mean, running_var, running_mean.stride(0), running_var.stride(0))
    return args + (momentum_hi, momentum - momentum_hi), True


def _launch_batch_stats(x, view, eps, running=None):
    """(mean, var, invstd) of each channel of a non-empty canonical x, accumulation dtype; with
    running = (running_mean, running_var, momentum), the running statistics are updated in the
    kernels' per-channel finalize."""
    acc = acc_dtype(x.dtype)
    c = view.n_channels
    mean, var, invstd = (x.new_empty((c,), dtype=acc) for _ in range(3))
    plan, mean_part, m2_part = _plan_with_partials(x, view, mean)
    single = plan.num_splits == 1
    update_args, update = _running_update_args(running, mean)
    _launchable(kernels._bn_fwd_stats_kernel)[_split_grid(view, plan)](
        x, *_view_strides(x, view),
        mean_part, m2_part, mean, var, invstd, *update_args,
        view.n_outer, c, view.n_inner, plan.chunk_a, plan.chunk_b, plan.splits_b, eps,
        SINGLE_SPLIT=single, UPDATE_RUNNING=update and single,
    )
    if not single:
        _launchable(kernels._bn_fwd_stats_combine_kernel)[(triton.cdiv(c, _COMBINE_BLOCK_C),)](
            mean_part, m2_part, mean, var, invstd, *update_args,
            view.n_outer, c, view.n_inner, plan.chunk_a, plan.chunk_b, plan.splits_b,
            plan.num_splits, eps,
            UPDATE_RUNNING=update, BLOCK_S=_COMBINE_BLOCK_S, BLOCK_C=_COMBINE_BLOCK_C,
        )
    return mean, var, invstd


def _launch_fwd_apply(x, view, residual, mean, spread, weight, bias, eps, spread_is_var):
    y = torch.empty_like(x)
    if residual is not None:
        r, r_strides = _operand(residual, x, view)
    else:
        r, r_strides = x, (0, 0, 0)
    _launchable(kernels._bn_act_fwd_apply_kernel)[_tile_grid(view)](
        x, *_view_strides(x, view),
        r, *r_strides,
        y,
        mean, spread,
        weight if weight is not None else mean,
        bias if bias is not None else mean,
        eps,
        view.n_outer, view.n_channels, view.n_inner,
        SPREAD_IS_VAR=spread_is_var,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
    )
    return y


def _launch_bwd_reduce(grad_out, out, x, view, mean, invstd):
    """(Σdz·x̂, Σdz) of each channel of a non-empty canonical x, accumulation dtype."""
    acc = acc_dtype(x.dtype)
    c = view.n_channels
    mean, invstd = mean.to(acc), invstd.to(acc)
    dy, dy_strides = _operand(grad_out, x, view)
    y, y_strides = _operand(out, x, view)
    sum_dz, sum_dz_xhat = (x.new_empty((c,), dtype=acc) for _ in range(2))
    plan, dz_part, dzx_part = _plan_with_partials(x, view, sum_dz)
    single = plan.num_splits == 1
    _launchable(kernels._bn_act_bwd_reduce_kernel)[_split_grid(view, plan)](
        dy, *dy_strides,
        y, *y_strides,
        x, *_view_strides(x, view),
        mean, invstd,
        dz_part, dzx_part, sum_dz, sum_dz_xhat,
        view.n_outer, c, view.n_inner, plan.chunk_a, plan.chunk_b, plan.splits_b,
        SINGLE_SPLIT=single,
    )
    if not single:
        _launchable(kernels._bn_act_bwd_reduce_combine_kernel)[(triton.cdiv(c, _COMBINE_BLOCK_C),)](
            dz_part, dzx_part, invstd, sum_dz, sum_dz_xhat,
            c, plan.num_splits,
            BLOCK_S=_COMBINE_BLOCK_S, BLOCK_C=_COMBINE_BLOCK_C,
        )
    return sum_dz_xhat, sum_dz


def _launch_bwd_apply(grad_out, out, x, view, weight, mean, invstd, dz_stat, dzx_stat, count,
                      batch_stats, residual_grad):
    """(grad_input, grad_residual) of a non-empty canonical x; the statistics of dz are
    dz_stat / count and dzx_stat / count."""
    acc = acc_dtype(x.dtype)
    mean, invstd = mean.to(acc), invstd.to(acc)
    dz_stat, dzx_stat = dz_stat.to(acc), dzx_stat.to(acc)
    dy, dy_strides = _operand(grad_out, x, view)
    y, y_strides = _operand(out, x, view)
    grad_input = torch.empty_like(x)
    grad_residual = empty_grad_residual(x, residual_grad)
    _launchable(kernels._bn_act_bwd_apply_kernel)[_tile_grid(view)](
        dy, *dy_strides,
        y, *y_strides,
        x, *_view_strides(x, view),
        grad_input, grad_residual if residual_grad else grad_input,
        weight if weight is not None else invstd,
        mean, invstd, dz_stat, dzx_stat, count,
        view.n_outer, view.n_channels, view.n_inner,
        BATCH_STATS=batch_stats,
        HAS_WEIGHT=weight is not None,
        WRITE_GRAD_RESIDUAL=residual_grad,
    )
    return grad_input, grad_residual


# ---------------------------------------------------------------------------------------------
# The ops (schemas and math: csrc/fused_resnet.cpp). An empty input launches nothing: its
# statistics are mean 0, var 0, and its reductions 0.


@triton_op(f"{LIBRARY}::bn_act_fwd_train", mutates_args=())
def bn_act_fwd_train(
    input: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    contract.check_fwd_train(input, residual, weight, bias)
    x = canonical_layout(input)
    relu_mask = empty_relu_mask(x)  # none kept: bn_act_bwd reads out
    if x.numel() == 0:
        var = x.new_zeros((x.shape[1],), dtype=acc_dtype(x.dtype))
        return torch.empty_like(x), torch.zeros_like(var), torch.rsqrt(var + eps), var, relu_mask
    view = view_of(x)
    mean, var, invstd = _launch_batch_stats(x, view, eps)
    out = _launch_fwd_apply(x, view, residual, mean, invstd, weight, bias, eps, spread_is_var=False)
    return out, mean, invstd, var, relu_mask


@triton_op(f"{LIBRARY}::bn_act_fwd_eval", mutates_args=())
def bn_act_fwd_eval(
    input: Tensor,
    residual: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
) -> Tensor:
    contract.check_fwd_eval(input, residual, running_mean, running_var, weight, bias)
    x = canonical_layout(input)
    if x.numel() == 0:
        return torch.empty_like(x)
    return _launch_fwd_apply(
        x, view_of(x), residual, running_mean, running_var, weight, bias, eps, spread_is_var=True
    )


@triton_op(f"{LIBRARY}::bn_act_bwd", mutates_args=())
def bn_act_bwd(
    grad_out: Tensor,
    out: Tensor,
    relu_mask: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    batch_stats: bool,
    residual_grad: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    contract.check_bwd(grad_out, out, relu_mask, input, weight, mean, invstd, 0)  # no mask kept
    x = canonical_layout(input)
    if x.numel() == 0:
        sum_dz = x.new_zeros((x.shape[1],), dtype=acc_dtype(x.dtype))
        return torch.empty_like(x), empty_grad_residual(x, residual_grad), torch.zeros_like(sum_dz), sum_dz
    view = view_of(x)
    sum_dz_xhat, sum_dz = _launch_bwd_reduce(grad_out, out, x, view, mean, invstd)
    grad_input, grad_residual = _launch_bwd_apply(
        grad_out, out, x, view, weight, mean, invstd, sum_dz, sum_dz_xhat, view.per_channel,
        batch_stats, residual_grad,
    )
    return grad_input, grad_residual, sum_dz_xhat, sum_dz


@triton_op(f"{LIBRARY}::bn_stats", mutates_args=())
def bn_stats(input: Tensor) -> Tuple[Tensor, Tensor]:
    contract.check_stats(input)
    x = canonical_layout(input)
    if x.numel() == 0:
        var = x.new_zeros((x.shape[1],), dtype=acc_dtype(x.dtype))
        return torch.zeros_like(var), var
    # invstd is computed on the way and dropped; any eps > 0 keeps it finite
    mean, var, _invstd = _launch_batch_stats(x, view_of(x), 1.0)
    return mean, var


@triton_op(f"{LIBRARY}::bn_act_bwd_reduce", mutates_args=())
def bn_act_bwd_reduce(grad_out: Tensor, out: Tensor, input: Tensor, mean: Tensor, invstd: Tensor) -> Tuple[Tensor, Tensor]:
    contract.check_bwd_reduce(grad_out, out, input, mean, invstd)
    x = canonical_layout(input)
    if x.numel() == 0:
        sum_dz = x.new_zeros((x.shape[1],), dtype=acc_dtype(x.dtype))
        return torch.zeros_like(sum_dz), sum_dz
    return _launch_bwd_reduce(grad_out, out, x, view_of(x), mean, invstd)


@triton_op(f"{LIBRARY}::bn_act_bwd_apply", mutates_args=())
def bn_act_bwd_apply(
    grad_out: Tensor,
    out: Tensor,
    input: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    mean_dz: Tensor,
    mean_dz_xhat: Tensor,
    residual_grad: bool,
) -> Tuple[Tensor, Tensor]:
    contract.check_bwd_apply(grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat)
    x = canonical_layout(input)
    if x.numel() == 0:
        return torch.empty_like(x), empty_grad_residual(x, residual_grad)
    return _launch_bwd_apply(
        grad_out, out, x, view_of(x), weight, mean, invstd, mean_dz, mean_dz_xhat, 1,
        True, residual_grad,
    )


# ---------------------------------------------------------------------------------------------
# bn_act: the schema of csrc/fused_resnet.cpp, in this library.

BN_ACT_SCHEMA = (
    "bn_act(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias,"
    " Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum,"
    " float eps) -> (Tensor out, Tensor save_mean, Tensor save_invstd, Tensor relu_mask)"
)
library = torch.library.Library(LIBRARY, "FRAGMENT")
# any layout in, outputs like the canonical input (csrc/fused_resnet.cpp's kAnyLayout)
library.define(BN_ACT_SCHEMA, tags=(torch.Tag.flexible_layout,))


def bn_act_kernel(input, residual, weight, bias, running_mean, running_var, training, momentum, eps):
    """One module call: the training forward with the running statistics updated in the
    statistics kernels' finalize, or the eval forward (csrc/fused_resnet.cpp).

    It is a device kernel, so it only ever sees real tensors (torch.compile sees bn_act through its
    fake impl): its launches go straight to the kernels, as triton_op's own device kernels do,
    rather than through wrap_triton's higher-order-op dispatch, which costs host time each launch."""
    with set_wrap_triton_enabled(False):
        return _bn_act(input, residual, weight, bias, running_mean, running_var, training, momentum, eps)


def _bn_act(input, residual, weight, bias, running_mean, running_var, training, momentum, eps):
    contract.check_bn_act(input, residual, weight, bias, running_mean, running_var, training)
    x = canonical_layout(input)
    relu_mask = empty_relu_mask(x)  # none kept: bn_act_bwd reads out
    acc = acc_dtype(x.dtype)
    if not training:
        none = x.new_empty((0,), dtype=acc)
        if x.numel() == 0:
            return torch.empty_like(x), none, none.clone(), relu_mask
        out = _launch_fwd_apply(
            x, view_of(x), residual, running_mean, running_var, weight, bias, eps, spread_is_var=True
        )
        return out, none, none.clone(), relu_mask
    if x.numel() == 0:  # an empty batch updates nothing
        var = x.new_zeros((x.shape[1],), dtype=acc)
        return torch.empty_like(x), torch.zeros_like(var), torch.rsqrt(var + eps), relu_mask
    view = view_of(x)
    running = (running_mean, running_var, momentum) if running_mean is not None else None
    mean, _var, invstd = _launch_batch_stats(x, view, eps, running)
    out = _launch_fwd_apply(x, view, residual, mean, invstd, weight, bias, eps, spread_is_var=False)
    return out, mean, invstd, relu_mask


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
