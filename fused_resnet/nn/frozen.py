"""Frozen BatchNorm for fine-tuning: fixed statistics and affine, fused with the ReLU (and the add).

The fused analogue of torchvision.ops.FrozenBatchNorm2d, for inputs of any rank from 2 (N, C) to
5 (N, C, D, H, W):

    scale = weight / sqrt(running_var + eps),   shift = bias - running_mean * scale
    FrozenBatchNorm(C)(x)                  == x * scale + shift
    FrozenBatchNormReLU(C)(x)              == relu(x * scale + shift)
    FrozenBatchNormAddReLU(C)(x, residual) == relu(x * scale + shift + residual)
    FrozenBatchNormAct(C, act=a)(x)        == a(x * scale + shift)
    FrozenBatchNormAddAct(C, act=a)(x, r)  == a(x * scale + shift + r)

They hold torchvision's layout: buffers weight (ones), bias (zeros), running_mean (zeros),
running_var (ones) and a float eps; no parameters. The statistics and the affine are the same in
train and eval mode and get no gradient; gradients flow to the input and the residual. Loading a
state dict drops a `num_batches_tracked` key, as torchvision's does, so the state dicts of
nn.BatchNorm*d and of the fused modules load strictly. FrozenBatchNormReLU and
FrozenBatchNormAddReLU run the fused eval-mode kernel (one pass: read x (and the residual), write
the output); FrozenBatchNorm is plain eager PyTorch, for the BatchNorms no ReLU follows.

`freeze_batchnorm(model)` puts them in place of a model's BatchNorms. The fused ones are not
subclasses of FrozenBatchNorm, so no tool mistakes them for a plain frozen BatchNorm and drops
their ReLU.
"""

import torch
from torch import nn

from .. import contract, functional
from ..contract import DEFAULT_ACT, DEFAULT_NEGATIVE_SLOPE
from .batchnorm import EAGER_BATCHNORMS, _BatchNormAddAct, _BatchNormAct, activation_repr, check_channels
from .tracing import record_module_call, refuse_script


class _FrozenNorm(nn.Module):
    """torchvision FrozenBatchNorm2d's buffers, state-dict loading and repr."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # nn.BatchNorm's counter means nothing once the statistics are frozen (torchvision drops
        # it too); load_state_dict hands each module its own copy of the dict.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class FrozenBatchNorm(_FrozenNorm):
    """x * scale + shift with frozen statistics and affine, in eager PyTorch ops: the frozen twin
    of a plain nn.BatchNorm1d/2d/3d, for (N, C, *) input."""

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        # Channels last, so that the per-channel vectors broadcast whatever the rank, with no
        # Python on the rank that torch.fx could not trace; both views keep x's memory format.
        return (x.movedim(1, -1) * scale + shift).movedim(-1, 1)


class _FrozenFusedNorm(_FrozenNorm):
    __prepare_scriptable__ = refuse_script
    act = DEFAULT_ACT  # the ReLU modules' activation; the Act ones set their own
    negative_slope = DEFAULT_NEGATIVE_SLOPE

    def _frozen_forward(self, input, residual):
        check_channels(self, input)
        # training=False: the running statistics normalize, and nothing updates them
        return functional.batch_norm_act(
            input, residual, self.weight, self.bias, self.running_mean, self.running_var, False,
            0.0, self.eps, self.act, self.negative_slope,
        )


class FrozenBatchNormReLU(_FrozenFusedNorm):
    """relu(x * scale + shift) with frozen statistics and affine, in one fused kernel."""

    def forward(self, input):
        traced = record_module_call(self, input)  # a leaf for torch.fx (nn/tracing.py)
        return traced if traced is not None else self._frozen_forward(input, None)


class FrozenBatchNormAddReLU(_FrozenFusedNorm):
    """relu(x * scale + shift + residual) with frozen statistics and affine, in one fused kernel."""

    def forward(self, input, residual):
        traced = record_module_call(self, input, residual)
        return traced if traced is not None else self._frozen_forward(input, residual)


class _FrozenActArguments:
    def __init__(self, num_features: int, eps: float = 1e-5, *, act: str = DEFAULT_ACT,
                 negative_slope: float = DEFAULT_NEGATIVE_SLOPE):
        contract.check_act(type(self).__name__, act, negative_slope)
        super().__init__(num_features, eps)
        self.act = act
        self.negative_slope = float(negative_slope)

    def extra_repr(self):
        return f"{super().extra_repr()}, {activation_repr(self)}"


class FrozenBatchNormAct(_FrozenActArguments, FrozenBatchNormReLU):
    """act(x * scale + shift) with frozen statistics and affine, in one fused kernel."""


class FrozenBatchNormAddAct(_FrozenActArguments, FrozenBatchNormAddReLU):
    """act(x * scale + shift + residual) with frozen statistics and affine, in one fused kernel."""


# ---------------------------------------------------------------------------------------------
# Freezing a model's BatchNorms.

_SYNC_BATCHNORMS = (nn.SyncBatchNorm,)


def _frozen_class(module):
    """The frozen class for `module`, or None for a module freeze_batchnorm leaves as it is.

    The fused modules (SyncBatchNorm ones included) by isinstance; plain BatchNorms by exact type,
    since every fused module is also an nn.BatchNorm*d and other subclasses may do more."""
    if isinstance(module, _BatchNormAddAct):
        return FrozenBatchNormAddReLU if module.act == "relu" else FrozenBatchNormAddAct
    if isinstance(module, _BatchNormAct):
        return FrozenBatchNormReLU if module.act == "relu" else FrozenBatchNormAct
    if type(module) in EAGER_BATCHNORMS or type(module) in _SYNC_BATCHNORMS:
        return FrozenBatchNorm
    return None


@torch.no_grad()
def _frozen_twin(bn, frozen_class, name):
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"freeze_batchnorm: {name or 'the module'} ({type(bn).__name__}) has no running "
            "statistics (track_running_stats=False), so there is nothing to freeze"
        )
    if frozen_class in (FrozenBatchNormAct, FrozenBatchNormAddAct):
        frozen = frozen_class(bn.num_features, eps=float(bn.eps), act=bn.act, negative_slope=bn.negative_slope)
    else:
        frozen = frozen_class(bn.num_features, eps=float(bn.eps))
    # Copies, in the source's own dtype and device: freezing never aliases the model's tensors.
    frozen.running_mean = bn.running_mean.detach().clone()
    frozen.running_var = bn.running_var.detach().clone()
    if bn.weight is not None:
        frozen.weight = bn.weight.detach().clone()
        frozen.bias = bn.bias.detach().clone()
    else:  # affine=False: the identity affine, with the statistics' dtype and device
        frozen.weight = torch.ones_like(frozen.running_mean)
        frozen.bias = torch.zeros_like(frozen.running_mean)
    frozen.train(bn.training)
    return frozen


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm of `module` by its frozen twin, in its parent, and return `module`.

    BatchNormReLU*d (and SyncBatchNormReLU) become FrozenBatchNormReLU, BatchNormAddReLU*d (and
    SyncBatchNormAddReLU) FrozenBatchNormAddReLU, and nn.BatchNorm1d/2d/3d and nn.SyncBatchNorm
    (exactly those types) FrozenBatchNorm, each with a copy of the running statistics, weight,
    bias and eps, and the same train/eval mode. Any other module stays as it is. If `module` is
    itself one of these, its frozen twin is returned. A BatchNorm shared by several parents
    becomes one frozen module shared the same way. Hooks registered on a BatchNorm do not move.

    All twins are built before any is put in place: a BatchNorm without running statistics
    (track_running_stats=False) raises a ValueError and leaves the model unchanged.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"freeze_batchnorm: expected an nn.Module, got {type(module).__module__}."
            f"{type(module).__qualname__}"
        )
    twins = {}  # id(BatchNorm) -> its frozen twin
    for name, child in module.named_modules():
        frozen_class = _frozen_class(child)
        if frozen_class is not None:
            twins[id(child)] = _frozen_twin(child, frozen_class, name)
    if id(module) in twins:
        return twins[id(module)]
    placements = [
        (parent, name, twins[id(child)])
        for parent in module.modules()
        for name, child in parent._modules.items()  # every name, even of a child held twice
        if child is not None and id(child) in twins
    ]
    for parent, name, frozen in placements:
        parent.add_module(name, frozen)
    return module
