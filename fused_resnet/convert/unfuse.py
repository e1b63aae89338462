"""unfuse(model): the plain model back, for tools that expect nn.BatchNorm and its activation
apart.

Third-party BatchNorm tools treat a fused module as the nn.BatchNorm*d it subclasses and silently
drop its activation (timm.layers.freeze_batch_norm_2d; torch.nn.utils.fusion.fuse_conv_bn_eval followed
by an nn.Identity in the BatchNorm's place). unfuse gives them plain modules, with the same
state_dict keys and the same parameter and buffer objects:

- each module convert rewrote gets its own class and forward back (a GraphModule its graph):
  the forward that calls the activation modules and functions and makes the adds, with the
  activation modules it had (convert takes their calls out of the forward, never the modules);
- each BatchNorm convert fused gets the class it had (nn.BatchNorm2d, timm's BatchNormAct2d,
  nn.SyncBatchNorm after convert(..., sync_batchnorm=True), torchvision's FrozenBatchNorm2d,
  timm's FrozenBatchNormAct2d, this package's FrozenBatchNorm), without the activation
  attributes convert set (timm's modules apply their own `act` module again);
- the fused BatchNorms of this package's blocks and ResNets become nn.BatchNorm*d: those
  forwards apply the ReLU and the add themselves when the norm does not;
- what optimize_for_inference left of a folded BatchNorm that convert had fused becomes the
  nn.Identity a folded eager BatchNorm is, since the forward given back adds and applies the
  activation itself: an AddReLU or AddAct, and the activation module in place of a folded
  BatchNormAct*d (marked FOLDED_ACTIVATION; a timm norm-act's own activation stays).

A fused module it cannot give back (one a user's own forward calls expecting the activation, a
frozen one that freeze_batchnorm made) is named in a ValueError before anything changes.
"""

import copy

from torch import nn

from .fuse import FUSED_NORMS, _check_module
from .inference import FOLDED_ACTIVATION
from ..nn.batchnorm import EAGER_BATCHNORMS, UNFUSED_CLASS, AddReLU
from ..nn.frozen import _FrozenFusedNorm
from .rewrite.graphs import UNFUSED_GRAPH, is_rewritten, original_class, set_graph
from .rewrite.norms import unfuse_norm
from .rewrite.undo import all_or_nothing

_ADAPTIVE_FORWARDS = ("fused_resnet.nn.blocks", "fused_resnet.models.resnet")


def _adapts_to_plain_norms(module):
    """This package's blocks and ResNets: their forward calls norm_relu / norm_add_relu."""
    return getattr(type(module).forward, "__module__", "") in _ADAPTIVE_FORWARDS


def _plain_class(norm, parent):
    """The class `norm` goes back to, or None when it cannot."""
    if UNFUSED_CLASS in norm.__dict__:
        return norm.__dict__[UNFUSED_CLASS]
    if parent is not None and _adapts_to_plain_norms(parent):
        if isinstance(norm, nn.SyncBatchNorm):
            return nn.SyncBatchNorm
        return next((c for c in type(norm).__mro__ if c in EAGER_BATCHNORMS), None)
    return None


def unfuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The plain twin of `model` (a deep copy unless inplace=True): see the module docstring."""
    _check_module("unfuse", model)
    modules = dict(model.named_modules())
    refused = []
    for name, module in modules.items():
        parent = modules.get(name.rpartition(".")[0]) if name else None
        if isinstance(module, FUSED_NORMS) and _plain_class(module, parent) is None:
            refused.append(f"{name or '<model>'} ({type(module).__name__}, not made by fused_resnet.convert)")
        elif isinstance(module, _FrozenFusedNorm) and UNFUSED_CLASS not in module.__dict__:
            refused.append(f"{name or '<model>'} ({type(module).__name__}: unfuse before freezing)")
    if refused:
        raise ValueError(
            "fused_resnet.unfuse: these fused modules have no plain equivalent that their callers "
            "expect, the model is unchanged: " + ", ".join(refused)
        )
    model = model if inplace else copy.deepcopy(model)
    with all_or_nothing(model):
        for name, module in list(model.named_modules()):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if name else None
            if is_rewritten(module):
                _restore_forward(module)
            if UNFUSED_CLASS in module.__dict__:  # fused by convert
                unfuse_norm(module)
            elif isinstance(module, FUSED_NORMS):
                module.__class__ = _plain_class(module, parent)
            elif (isinstance(module, AddReLU) or module.__dict__.get(FOLDED_ACTIVATION)) and parent is not None:
                setattr(parent, attr, nn.Identity())
    return model


def _restore_forward(module):
    if UNFUSED_GRAPH in getattr(module, "meta", {}):
        set_graph(module, module.meta.pop(UNFUSED_GRAPH))
    else:
        module.__class__ = original_class(module)
