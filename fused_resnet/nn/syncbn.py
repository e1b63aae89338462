"""Synchronized fused BatchNorm: batch statistics over every process of a torch.distributed group.

    SyncBatchNormReLU(C)(x)                == relu(nn.SyncBatchNorm(C)(x))
    SyncBatchNormAddReLU(C)(x, r)          == relu(nn.SyncBatchNorm(C)(x) + r)
    SyncBatchNormAct(C, act=a)(x)          == a(nn.SyncBatchNorm(C)(x))
    SyncBatchNormAddAct(C, act=a)(x, r)    == a(nn.SyncBatchNorm(C)(x) + r)

for inputs of any rank from 2 (N, C) to 5 (N, C, D, H, W), on any backend: NCCL on GPUs, gloo on
CPU tensors (which nn.SyncBatchNorm refuses). They subclass nn.SyncBatchNorm: same constructor
(process_group included), parameters, buffers and state_dict keys.

Training step, per rank, with the backend's ops (fused_resnet/ops.py) and two collectives:

  forward   bn_stats(x)                 local (count, mean, M2 = var·count) per channel
            all_gather, once            every rank's (count, mean, M2): 2C + 1 float64 values
            Chan's merge (float64)      n = Σ n_i,  mean = Σ n_i·mean_i / n,
                                        M2 = Σ (M2_i + n_i·(mean_i − mean)²),  var = M2 / n
            bn_act_fwd_eval(x, r, mean, var, w, b, eps)
            running statistics          nn.SyncBatchNorm's update, unbiased with the global n
  backward  bn_act_bwd_reduce           local Σdz, Σdz·x̂
            all_reduce (sum), once      the packed [Σdz, Σdz·x̂]: 2C values
            bn_act_bwd_apply            dx, dr with the global means Σdz / n, Σdz·x̂ / n
            grad_weight, grad_bias      the local sums: per rank, as nn.SyncBatchNorm; DDP
                                        averages them

Why all_gather of (count, mean, M2) and not all_reduce of sums: summing (n, Σx, Σx²) over ranks
gives the variance as E[x²] − E[x]², which cancels catastrophically when |mean| ≫ std (in
float32, a mean of 1000 with std 1 loses every digit of the variance). Gathering each rank's
centred M2 and merging with Chan's formula adds only non-negative terms. The gathered data are
2C + 1 values per rank, negligible next to the activations. Ranks with an empty batch send
count 0 and drop out of the merge.

Eval mode, a world size of 1, or no initialized process group: exactly the non-sync fused modules
(fused_resnet/nn/batchnorm.py), with no communication.

Ranks must agree on the number of channels: tensors of different sizes in one collective abort
the process (gloo) or hang (NCCL). The first synchronized forward of each module therefore
gathers num_features once per process group and raises a clear error on every rank when they
differ; afterwards the local check of the input against num_features is enough.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from .. import backend as _backend
from .. import contract
from ..contract import acc_dtype
from ..reference import update_running_stats
from .batchnorm import (
    UNFUSED_CLASS, _ActArguments, _BatchNormAct, _BatchNormAddAct, _FusedBatchNormMixin, check_channels,
)


class _SyncBatchNormActFunction(torch.autograd.Function):
    """act(batch_norm(x) (+ r)) with given global batch statistics; the backward all-reduces
    the two per-channel sums once. The statistics' dependence on x is in the backward formula.
    It keeps out where the activation's backward reads it, the residual where it recomputes z."""

    @staticmethod
    def forward(ctx, input, residual, weight, bias, mean, var, eps, impl, group, count, act, negative_slope):
        out = impl.bn_act_fwd_eval(input, residual, mean, var, weight, bias, eps, act, negative_slope)
        # invstd as fwd_eval computes it: in float64 from var, rounded once
        invstd = torch.rsqrt(var.double() + eps).to(var.dtype)
        reads_out = contract.backward_reads_out(act)
        kept_residual = residual if contract.backward_recomputes_z(act) else None
        ctx.save_for_backward(input, out if reads_out else None, weight, bias, mean, invstd, kept_residual)
        ctx.impl, ctx.group, ctx.count = impl, group, count
        ctx.act, ctx.negative_slope = act, negative_slope
        ctx.param_dtypes = tuple(None if p is None else p.dtype for p in (weight, bias))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, out, weight, bias, mean, invstd, residual = ctx.saved_tensors
        need_input, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
        impl, act = ctx.impl, (ctx.act, ctx.negative_slope)
        grad_input = grad_residual = grad_weight = grad_bias = None
        if need_input or need_weight or need_bias:
            sum_dz_xhat, sum_dz = impl.bn_act_bwd_reduce(
                grad_out, out, input, mean, invstd, residual, weight, bias, *act
            )
            weight_dtype, bias_dtype = ctx.param_dtypes
            if need_weight:
                grad_weight = sum_dz_xhat.to(weight_dtype)
            if need_bias:
                grad_bias = sum_dz.to(bias_dtype)
        if need_input:
            channels = mean.shape[0]
            packed = torch.cat([sum_dz, sum_dz_xhat])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=ctx.group)
            mean_dz, mean_dz_xhat = packed.div_(ctx.count).split(channels)
            grad_input, grad_residual = impl.bn_act_bwd_apply(
                grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat, need_residual, residual, bias,
                *act,
            )
            grad_residual = grad_residual if need_residual else None  # else an empty tensor
        elif need_residual:
            # grad_residual = dz needs no global statistics: any means do
            zeros = torch.zeros_like(mean)
            _, grad_residual = impl.bn_act_bwd_apply(
                grad_out, out, input, weight, mean, invstd, zeros, zeros, True, residual, bias, *act
            )
        return (grad_input, grad_residual, grad_weight, grad_bias) + (None,) * 8


def _gather_batch_stats(impl, input, group, world_size, caller):
    """Global per-channel (mean, biased var) in float64 and the global count: one all_gather."""
    channels = input.shape[1]
    count = input.numel() // channels
    with torch.no_grad():
        mean, var = impl.bn_stats(input)
        mean, var = mean.double(), var.double()
        packed = torch.cat([mean.new_full((1,), count), mean, var * count])  # (n, mean, M2)
        gathered = [torch.empty_like(packed) for _ in range(world_size)]
        dist.all_gather(gathered, packed, group=group)
        gathered = torch.stack(gathered)
        counts, means, m2s = gathered[:, :1], gathered[:, 1 : channels + 1], gathered[:, channels + 1 :]
        total = int(counts.sum().item())
        if total == 1:
            raise ValueError(
                f"{caller}: Expected more than 1 value per channel when training, got 1 value per "
                f"channel over {world_size} processes (local input size {input.size()})"
            )
        if total == 0:  # every rank's batch is empty: the ops' convention, mean 0 and var 0
            return mean.new_zeros(channels), mean.new_zeros(channels), 0
        global_mean = (counts * means).sum(0) / total
        global_m2 = (m2s + counts * (means - global_mean).square()).sum(0)
    return global_mean, global_m2 / total, total


class _SyncFusedBatchNormMixin(_FusedBatchNormMixin):
    """nn.SyncBatchNorm's forward on the fused ops; every check runs before any state changes."""

    def _sync_group(self):
        """(process group, world size) when this call synchronizes, else None (as nn.SyncBatchNorm)."""
        batch_stats = self._mode()[0]
        if not (self.training and batch_stats and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group else dist.group.WORLD
        world_size = dist.get_world_size(group)
        return (group, world_size) if world_size > 1 else None

    def _check_channels_agree(self, group, world_size, device):
        """Once per process group: every rank's num_features, gathered, must be equal."""
        key = (id(group), world_size)
        if getattr(self, "_channels_agreed_in", None) == key:
            return
        mine = torch.tensor([self.num_features], dtype=torch.int64, device=device)
        gathered = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(gathered, mine, group=group)
        counts = [int(t.item()) for t in gathered]
        if len(set(counts)) != 1:
            raise ValueError(
                f"{type(self).__name__}: the processes disagree on the number of channels "
                f"(num_features by rank in the process group: {counts}); every rank must run the "
                "same model"
            )
        self._channels_agreed_in = key

    def _sync_forward(self, input, residual):
        sync = self._sync_group()
        if sync is None:
            return self._fused_forward(input, residual)
        group, world_size = sync

        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        check_channels(self, input)
        _, running_mean, running_var, counts_steps = self._mode()
        caller = type(self).__name__
        contract.check_bn_act(  # values_per_channel: _gather_batch_stats checks the global count
            input, residual, self.weight, self.bias, running_mean, running_var, True, self.eps,
            self.act, self.negative_slope, values_per_channel=False,
        )
        self._check_channels_agree(group, world_size, input.device)

        impl = _backend.ops_for(input)
        mean, var, count = _gather_batch_stats(impl, input, group, world_size, caller)
        # every check has passed: the state may change now
        momentum = self._step_momentum(counts_steps)
        if counts_steps:
            self.num_batches_tracked.add_(1)
        acc = acc_dtype(input.dtype)
        out = _SyncBatchNormActFunction.apply(
            input, residual, self.weight, self.bias, mean.to(acc), var.to(acc), self.eps, impl, group, count,
            self.act, self.negative_slope,
        )
        if running_mean is not None:
            update_running_stats(running_mean, running_var, mean, var, count, momentum)
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """fused_resnet.nn.convert_sync_batchnorm (the fused modules keep their activation)."""
        return convert_sync_batchnorm(module, process_group)


class SyncBatchNormReLU(_SyncFusedBatchNormMixin, _BatchNormAct, nn.SyncBatchNorm):
    """relu(SyncBatchNorm(x)) for input of rank 2 to 5, (N, C, *)."""

    def forward(self, input):
        return self._sync_forward(input, None)


class SyncBatchNormAddReLU(_SyncFusedBatchNormMixin, _BatchNormAddAct, nn.SyncBatchNorm):
    """relu(SyncBatchNorm(x) + residual) for input of rank 2 to 5, (N, C, *)."""

    def forward(self, input, residual):
        return self._sync_forward(input, residual)


class SyncBatchNormAct(_ActArguments, SyncBatchNormReLU):
    """act(SyncBatchNorm(x)) for input of rank 2 to 5, (N, C, *)."""


class SyncBatchNormAddAct(_ActArguments, SyncBatchNormAddReLU):
    """act(SyncBatchNorm(x) + residual) for input of rank 2 to 5, (N, C, *)."""


class DistributedDataParallel(nn.parallel.DistributedDataParallel):
    """torch.nn.parallel.DistributedDataParallel that accepts the fused sync modules on CPU.

    DDP refuses any nn.SyncBatchNorm in a CPU module ("SyncBatchNorm layers only work with GPU
    modules"), since nn.SyncBatchNorm's own kernels are GPU-only. The fused sync modules subclass
    nn.SyncBatchNorm but run on CPU tensors with gloo, so here DDP's check applies to the other
    SyncBatchNorm layers only. Everything else is DDP itself; with GPU modules torch's DDP works
    as well.
    """

    def _passing_sync_batchnorm_handle(self, module):
        others = [
            m for m in module.modules()
            if isinstance(m, nn.SyncBatchNorm) and not isinstance(m, _SyncFusedBatchNormMixin)
        ]
        super()._passing_sync_batchnorm_handle(nn.ModuleList(others))


def _sync_class(module):
    """The synchronized class of `module`, and the keywords that give it the same activation."""
    if isinstance(module, (_BatchNormAct, _BatchNormAddAct)):
        residual = isinstance(module, _BatchNormAddAct)
        if module.act == "relu":
            return (SyncBatchNormAddReLU if residual else SyncBatchNormReLU), {}
        keywords = {"act": module.act, "negative_slope": module.negative_slope}
        return (SyncBatchNormAddAct if residual else SyncBatchNormAct), keywords
    return nn.SyncBatchNorm, {}


def convert_sync_batchnorm(module, process_group=None):
    """Replace every BatchNorm in `module` by its synchronized equivalent, as
    nn.SyncBatchNorm.convert_sync_batchnorm does, keeping the fused activations:

        BatchNormReLU1d/2d/3d     -> SyncBatchNormReLU
        BatchNormAddReLU1d/2d/3d  -> SyncBatchNormAddReLU
        BatchNormAct1d/2d/3d      -> SyncBatchNormAct, the same activation
        BatchNormAddAct1d/2d/3d   -> SyncBatchNormAddAct, the same activation
        any other nn.BatchNorm*d  -> nn.SyncBatchNorm

    The new modules take over the parameters and buffers themselves (an optimizer built before
    still holds them), the hyperparameters, the training mode and any qconfig; names in the
    module tree are kept. Returns `module`, or the new module if `module` itself is a BatchNorm.

    nn.SyncBatchNorm.convert_sync_batchnorm would turn a fused module into a plain
    nn.SyncBatchNorm and silently drop its ReLU: use this function (or the classmethod of the
    fused sync modules) on models holding fused modules. nn.SyncBatchNorm itself refuses CPU
    tensors in synchronized training; the fused ones do not.
    """
    converted = module
    if isinstance(module, _BatchNorm):
        sync_class, keywords = _sync_class(module)
        converted = sync_class(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            **keywords,
        )
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
        if UNFUSED_CLASS in module.__dict__:  # fused by convert: unfuse makes it nn.SyncBatchNorm
            converted.__dict__[UNFUSED_CLASS] = nn.SyncBatchNorm
    for name, child in module.named_children():
        child = convert_sync_batchnorm(child, process_group)
        if name in converted.__dict__:
            # a fused timm BatchNormAct2d keeps its `act` child (for unfuse) beside the fused
            # module's `act` attribute, the activation's name, which add_module would refuse
            converted._modules[name] = child
        else:
            converted.add_module(name, child)
    return converted


__all__ = [
    "SyncBatchNormReLU", "SyncBatchNormAddReLU", "SyncBatchNormAct", "SyncBatchNormAddAct", "convert_sync_batchnorm",
    "DistributedDataParallel",
]
