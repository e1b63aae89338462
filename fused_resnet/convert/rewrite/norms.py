"""Which modules convert takes for BatchNorms, and the class change that fuses one.

    nn.BatchNorm1d/2d/3d (exactly)               -> BatchNormReLU*d, BatchNormAddReLU*d
    timm's BatchNormAct2d                        as nn.BatchNorm2d when its activation is
                                                 nn.Identity; with a ReLU, BatchNormReLU2d by itself
    torchvision.ops.FrozenBatchNorm2d (exactly;  -> FrozenBatchNormReLU, FrozenBatchNormAddReLU
      timm's freeze_batch_norm_2d puts it in),
      this package's FrozenBatchNorm
    timm's FrozenBatchNormAct2d                  as FrozenBatchNorm2d when its activation is
                                                 nn.Identity; with a ReLU, FrozenBatchNormReLU by itself

A frozen BatchNorm is a per-channel affine map, x * scale + shift (scale = weight /
sqrt(running_var + eps), shift = bias - running_mean * scale), the same in train and eval mode and
never updated: followed by a ReLU (and an add) it is one pass of the fused eval kernel forward and
one backward (grad_input, grad_residual), where eager makes three or four. Other BatchNorm
classes (nn.SyncBatchNorm, subclasses of these, which may compute something else) are listed, not
fused.

The classes of torchvision and timm are recognized by where they are defined, so neither library
is imported. Fusing changes only the class of the object: its parameters, buffers, state dict keys
(the frozen modules' loading drops `num_batches_tracked`, as torchvision's does), settings and mode
stay, and the class it had is kept for unfuse. torchvision's FrozenBatchNorm2d has no
`num_features` (unless timm's freeze_batch_norm_2d set one), which the fused modules check their
input against: it is added, and unfuse takes it away again.
"""

from torch import nn

from ...nn.batchnorm import EAGER_BATCHNORMS, UNFUSED_CLASS, _BatchNormAddAct, _BatchNormAct, fuse_batchnorm_
from ...nn.frozen import FrozenBatchNorm, FrozenBatchNormAddReLU, FrozenBatchNormReLU, _FrozenFusedNorm, _FrozenNorm
from .patterns import cannot, hooked, unsupported

PLAIN = "plain"  # normalizes only: it fuses with the ReLU or add + ReLU that follows
APPLIES_RELU = "applies relu"  # applies its own ReLU: it becomes a BatchNormReLU*d by itself

_TORCHVISION_FROZEN = ("torchvision.ops.misc", "FrozenBatchNorm2d")
_TIMM_NORM_ACT = ("timm.layers.norm_act", "BatchNormAct2d")
_TIMM_FROZEN_NORM_ACT = ("timm.layers.norm_act", "FrozenBatchNormAct2d")
_ADDED_NUM_FEATURES = "_fused_resnet_added_num_features"


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
    """PLAIN, APPLIES_RELU, a reason (str) for a BatchNorm convert does not fuse, or None for a
    module that is no BatchNorm. Fused modules are None: they are done."""
    cls = type(module)
    if cls in EAGER_BATCHNORMS or cls is FrozenBatchNorm or _key(cls) == _TORCHVISION_FROZEN:
        return PLAIN
    if not is_norm(module) or is_fused(module):
        return None
    if _key(cls) not in (_TIMM_NORM_ACT, _TIMM_FROZEN_NORM_ACT):
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
    if type(act) is nn.ReLU:
        return APPLIES_RELU
    return cannot(f"it applies {type(act).__name__}, and only a ReLU fuses")


def fuse_norm(norm, with_residual):
    """Make `norm` (PLAIN or APPLIES_RELU) its fused twin in place, keeping its class for unfuse."""
    unfused = type(norm)
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        norm.__class__ = next(c for c in unfused.__mro__ if c in EAGER_BATCHNORMS)
        fuse_batchnorm_(norm, with_residual)
    else:
        if "num_features" not in norm.__dict__:
            norm.__dict__["num_features"] = norm.weight.shape[0]
            norm.__dict__[_ADDED_NUM_FEATURES] = True
        norm.__class__ = FrozenBatchNormAddReLU if with_residual else FrozenBatchNormReLU
    norm.__dict__[UNFUSED_CLASS] = unfused


def unfuse_norm(norm):
    """Give a module fuse_norm fused the class (and attributes) it had."""
    norm.__class__ = norm.__dict__.pop(UNFUSED_CLASS)
    if norm.__dict__.pop(_ADDED_NUM_FEATURES, False):
        del norm.__dict__["num_features"]
