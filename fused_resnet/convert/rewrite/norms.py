"""Which modules convert takes for BatchNorms, and the class change that fuses one.

    nn.BatchNorm1d/2d/3d (exactly)               -> BatchNormReLU*d, BatchNormAddReLU*d (ReLU),
                                                    BatchNormAct*d, BatchNormAddAct*d (the others)
    timm's BatchNormAct2d                        as nn.BatchNorm2d when its activation is
                                                 nn.Identity (apply_act=False); with one of
                                                 rewrite/activations.py's, BatchNormReLU2d or
                                                 BatchNormAct2d by itself
    torchvision.ops.FrozenBatchNorm2d (exactly;  -> FrozenBatchNormReLU, FrozenBatchNormAddReLU,
      timm's freeze_batch_norm_2d puts it in),      FrozenBatchNormAct, FrozenBatchNormAddAct
      this package's FrozenBatchNorm
    timm's FrozenBatchNormAct2d                  as FrozenBatchNorm2d when its activation is
                                                 nn.Identity; with an activation it fuses,
                                                 FrozenBatchNormReLU or FrozenBatchNormAct by itself

A frozen BatchNorm is a per-channel affine map, x * scale + shift (scale = weight /
sqrt(running_var + eps), shift = bias - running_mean * scale), the same in train and eval mode and
never updated: followed by an activation (and an add) it is one pass of the fused eval kernel
forward and one backward (grad_input, grad_residual), where eager makes three or four. Other
BatchNorm classes (nn.SyncBatchNorm, subclasses of these, which may compute something else) are
listed, not fused.

The classes of torchvision and timm are recognized by where they are defined, so neither library
is imported. Fusing changes only the class of the object, and sets the activation's attributes
`act` and `negative_slope` of the Act classes: its parameters, buffers, state dict keys (the
frozen modules' loading drops `num_batches_tracked`, as torchvision's does), settings and mode
stay, and the class it had is kept for unfuse. timm's norm-act modules keep their `act` child
module too (it holds no state; the fused module's `act` attribute, a name, is read before it).
torchvision's FrozenBatchNorm2d has no `num_features` (unless timm's freeze_batch_norm_2d set
one), which the fused modules check their input against: it is added. unfuse takes away what
was added.
"""

from torch import nn

from ...nn.batchnorm import EAGER_BATCHNORMS, UNFUSED_CLASS, _BatchNormAddAct, _BatchNormAct, fuse_batchnorm_
from ...nn.frozen import (
    FrozenBatchNorm,
    FrozenBatchNormAct,
    FrozenBatchNormAddAct,
    FrozenBatchNormAddReLU,
    FrozenBatchNormReLU,
    _FrozenFusedNorm,
    _FrozenNorm,
)
from .activations import Activation, module_activation
from .patterns import cannot, hooked, unsupported

PLAIN = "plain"  # normalizes only: it fuses with the activation, or add (+ activation), that follows
APPLIES_ACT = "applies its activation"  # timm's norm-act: it becomes a BatchNormAct*d by itself

_TORCHVISION_FROZEN = ("torchvision.ops.misc", "FrozenBatchNorm2d")
_TIMM_NORM_ACT = ("timm.layers.norm_act", "BatchNormAct2d")
_TIMM_FROZEN_NORM_ACT = ("timm.layers.norm_act", "FrozenBatchNormAct2d")
_ADDED_NUM_FEATURES = "_fused_resnet_added_num_features"
_ADDED_ACTIVATION = "_fused_resnet_added_activation"  # act and negative_slope set by fuse_norm


def _key(cls):
    return cls.__module__, cls.__qualname__


def is_frozen(module):
    """A frozen BatchNorm of torchvision, timm or this package (or of a class derived from one)."""
    return isinstance(module, _FrozenNorm) or any(
        _key(c) in (_TORCHVISION_FROZEN, _TIMM_FROZEN_NORM_ACT) for c in type(module).__mro__
    )


def is_norm(module):
    """A module convert reports on: an nn.BatchNorm (any subclass) or a frozen BatchNorm, fused or not."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or is_frozen(module)


def is_fused(module):
    return isinstance(module, (_BatchNormAct, _BatchNormAddAct, _FrozenFusedNorm))


def norm_kind(module):
    """PLAIN, APPLIES_ACT, a reason (str) for a BatchNorm convert does not fuse, or None for a
    module that is no BatchNorm. Fused modules are None: they are done."""
    cls = type(module)
    if cls in EAGER_BATCHNORMS or cls is FrozenBatchNorm or _key(cls) == _TORCHVISION_FROZEN:
        return PLAIN
    if not is_norm(module) or is_fused(module):
        return None
    if not is_timm_norm_act(module):
        if is_frozen(module):
            return unsupported(f"{cls.__qualname__} derives from a frozen BatchNorm and may compute something else")
        return unsupported(f"{cls.__qualname__} is not nn.BatchNorm1d/2d/3d")
    # timm's (Frozen)BatchNormAct2d: the normalization, then self.drop, then self.act
    act, drop = module.act, module.drop
    if type(drop) is not nn.Identity:
        return unsupported(f"it applies {type(drop).__name__} between normalization and activation")
    if hooked(act) or hooked(drop):
        return unsupported("its activation or dropout layer has hooks")
    if type(act) is nn.Identity:
        return PLAIN
    found = module_activation(act)
    if isinstance(found, Activation):
        return APPLIES_ACT
    return cannot(f"it applies {type(act).__name__}, {found or 'which is not fused'}")


def is_timm_norm_act(module):
    """timm's BatchNormAct2d or FrozenBatchNormAct2d, exactly."""
    return _key(type(module)) in (_TIMM_NORM_ACT, _TIMM_FROZEN_NORM_ACT)


def own_activation(norm):
    """The Activation a module of kind APPLIES_ACT applies itself (timm's `act` child)."""
    return module_activation(norm._modules["act"])


def applies_own_activation(norm):
    """Whether the fused `norm` was made by fuse_norm from a module that applied its activation
    itself (APPLIES_ACT), rather than from one that only normalized (PLAIN)."""
    unfused = norm.__dict__.get(UNFUSED_CLASS)
    return unfused is not None and _key(unfused) in (_TIMM_NORM_ACT, _TIMM_FROZEN_NORM_ACT) and (
        type(norm._modules.get("act")) is not nn.Identity
    )


def fuse_norm(norm, with_residual, activation):
    """Make `norm` (PLAIN or APPLIES_ACT) its fused twin applying `activation` in place, keeping
    its class for unfuse."""
    unfused = type(norm)
    act, negative_slope = activation.act, activation.negative_slope
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        norm.__class__ = next(c for c in unfused.__mro__ if c in EAGER_BATCHNORMS)
        with _child_held_aside(norm, "act"):
            fuse_batchnorm_(norm, with_residual, act=act, negative_slope=negative_slope)
    else:
        if "num_features" not in norm.__dict__:
            norm.__dict__["num_features"] = norm.weight.shape[0]
            norm.__dict__[_ADDED_NUM_FEATURES] = True
        if act == "relu":
            norm.__class__ = FrozenBatchNormAddReLU if with_residual else FrozenBatchNormReLU
        else:
            norm.__class__ = FrozenBatchNormAddAct if with_residual else FrozenBatchNormAct
            norm.__dict__["act"], norm.__dict__["negative_slope"] = act, float(negative_slope)
    if act != "relu":
        norm.__dict__[_ADDED_ACTIVATION] = True
    norm.__dict__[UNFUSED_CLASS] = unfused


class _child_held_aside:
    """timm's norm-act holds its activation as the child module `act`, under the name that the
    fused module's activation attribute has: nn.Module's __setattr__ refuses a str in a child's
    place. The child is held aside while fuse_batchnorm_ sets the attribute, then put back in its
    place among the children (it holds no state; unfuse gives it its role back)."""

    def __init__(self, module, name):
        self.children, self.name = module._modules, name

    def __enter__(self):
        self.order = list(self.children.items())
        self.child = self.children.pop(self.name, None)

    def __exit__(self, *exc):
        if self.child is not None:
            self.children.clear()
            self.children.update(self.order)
        return False


def unfuse_norm(norm):
    """Give a module fuse_norm fused the class (and attributes) it had."""
    norm.__class__ = norm.__dict__.pop(UNFUSED_CLASS)
    if norm.__dict__.pop(_ADDED_NUM_FEATURES, False):
        del norm.__dict__["num_features"]
    if norm.__dict__.pop(_ADDED_ACTIVATION, False):
        del norm.__dict__["act"], norm.__dict__["negative_slope"]
