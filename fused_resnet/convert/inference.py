"""optimize_for_inference: fuse what convert fuses, then fold each eval-mode BatchNorm into the
convolution that feeds it.

Folding (W' = W * g / sqrt(var + eps) per output channel, b' = (b - mean) * g / sqrt(var + eps)
+ beta) needs a Conv1d/2d/3d, or a subclass that keeps their forward (torchvision's
Conv3DSimple), whose output only the BatchNorm reads; frozen BatchNorms (torchvision's, timm's)
fold the same way, fused or not. What a folded BatchNorm leaves in its place:

    nn.BatchNorm*d, a frozen BatchNorm             nn.Identity
    BatchNormReLU*d, BatchNormAct*d (frozen too)   its activation's module (activation_module):
                                                   the convolution, then the activation, one
                                                   pass as the fused kernel was
    BatchNormAddReLU*d (frozen too)                AddReLU: add + ReLU in one pass, the fused
                                                   kernel with identity statistics
    BatchNormAddAct*d (frozen too)                 AddAct: add + the activation in one pass,
                                                   likewise (identity included: one pass, x + r)
    timm's (Frozen)BatchNormAct2d                  its own activation module

convert runs first, so that an eager BatchNorm followed by an add and an activation becomes a
BatchNormAddAct*d, which folds into an AddAct: one pass where the eager add and activation make
two. A BatchNorm that follows no such convolution stays as convert left it (fused: one eval pass).
"""

import copy

import torch
import torch.fx
from torch import nn

from .. import contract
from ..contract import DEFAULT_NEGATIVE_SLOPE
from ..nn.batchnorm import (
    UNFUSED_CLASS, AddReLU, _BatchNormAddAct, _BatchNormAct, activation_module, activation_repr,
)
from ..nn.frozen import FrozenBatchNormAddReLU, FrozenBatchNormReLU, _FrozenFusedNorm
from .fuse import FUSED_NORMS, _bn_add_act, _check_module, _finish, _resolve, _Walk, convert
from .rewrite import norms
from .rewrite.undo import all_or_nothing

# Where a folded activation module (what is left of a BatchNormAct*d that convert fused with the
# activation its forward applied) says so: unfuse, giving that forward back, makes it nn.Identity.
FOLDED_ACTIVATION = "_fused_resnet_folded_activation"


class AddAct(AddReLU):
    """act(x + residual): a BatchNormAddAct*d once its normalization is folded into the
    preceding convolution: AddReLU's forward (the fused eval kernel with identity statistics,
    one pass) with the activation (one of contract.ACTIVATIONS) an argument.
    """

    def __init__(self, act: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE):
        contract.check_act("AddAct", act, negative_slope)
        super().__init__()
        self.act, self.negative_slope = act, float(negative_slope)

    def extra_repr(self):
        return activation_repr(self)


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _is_plain_conv(module):
    """A Conv1d/2d/3d, or a subclass that runs their forward: its output is W * x + b."""
    return (
        isinstance(module, _CONVS)
        and any(type(module).forward is c.forward for c in _CONVS)
        and "forward" not in module.__dict__
    )


@torch.no_grad()
def _fold_into_conv(conv, bn, undo):
    """W' = W * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps), in float64."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.weight is not None:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double() + bn.bias.double()
    bias = conv.bias.double() * scale if conv.bias is not None else 0.0
    per_out_channel = (-1,) + (1,) * (conv.weight.dim() - 1)
    undo.save(conv.weight)
    conv.weight.copy_((conv.weight.double() * scale.reshape(per_out_channel)).to(conv.weight.dtype))
    new_bias = (bias + shift).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    else:
        undo.save(conv.bias)
        conv.bias.copy_(new_bias)


_FUSED = FUSED_NORMS + (_FrozenFusedNorm,)


def _folded_replacement(bn):
    """What is left in place of `bn` once folded (the module docstring's table)."""
    if isinstance(bn, (_BatchNormAddAct, FrozenBatchNormAddReLU)):
        return AddReLU() if bn.act == "relu" else AddAct(bn.act, bn.negative_slope)
    if isinstance(bn, (_BatchNormAct, FrozenBatchNormReLU)):
        if norms.applies_own_activation(bn):  # timm's: its activation, as when it is not fused
            return bn._modules["act"]
        replacement = activation_module(bn.act, bn.negative_slope)
        if UNFUSED_CLASS in bn.__dict__:  # convert took the activation out of its caller's forward
            replacement.__dict__[FOLDED_ACTIVATION] = True
        return replacement
    if norms.is_timm_norm_act(bn):  # not fused: its activation, nn.Identity when it applies none
        return bn.act
    return nn.Identity()


def _foldable(norm):
    """A BatchNorm whose normalization folds and whose replacement computes the rest."""
    if isinstance(norm, _FUSED):
        return True
    if norms.is_timm_norm_act(norm):  # fused or not, as long as it applies nothing else
        return type(norm.drop) is nn.Identity
    return norms.norm_kind(norm) == norms.PLAIN


def _norm_call(module, node):
    """(norm target, input node) when `node` applies a BatchNorm (eager or fused): a call of the
    module, or a call of _bn_add_act that convert generated; else None."""
    if node.op == "call_module":
        norm, source = _resolve(module, node.target), node.args[0] if node.args else None
        target = node.target
    elif node.op == "call_function" and node.target is _bn_add_act and node.args[0].op == "get_attr":
        target, source = node.args[0].target, node.args[1]
        norm = _resolve(module, target)
    else:
        return None
    return (target, source) if norm is not None and _foldable(norm) else None


def _fold_target(walk, module, target, source):
    """The convolution the norm `target`, fed by `source`, folds into; None if it cannot."""
    bn = module.get_submodule(target)
    if bn.running_mean is None or bn.running_var is None:  # normalizes with batch statistics
        return None
    if not (isinstance(source, torch.fx.Node) and source.op == "call_module"):
        return None
    conv = module.get_submodule(source.target)
    channels = bn.running_mean.shape[0]  # torchvision's FrozenBatchNorm2d has no num_features
    if not _is_plain_conv(conv) or conv.out_channels != channels:
        return None
    if len(source.users) != 1 or walk.calls[id(conv)] != 1 or walk.owners[id(conv)] != 1:
        return None  # its output is used elsewhere too
    if conv._forward_hooks or conv._forward_pre_hooks or walk.why_not_alone(bn):
        return None
    return source.target


def optimize_for_inference(
    model: nn.Module, inplace: bool = False, verbose: bool = False, return_report: bool = False
):
    """An inference copy of the eval-mode `model`: fused by convert, then the BatchNorms folded
    into the convolutions that feed them (see the module docstring). The input model is left as
    it is unless inplace=True, and as it was if that fails. Refuses a model with any module in
    training mode. The report lists the folded BatchNorms apart from the fused ones."""
    _check_module("optimize_for_inference", model)
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            "fused_resnet.optimize_for_inference: the model must be in eval mode (call "
            f"model.eval() first); {len(training)} module(s) are in training mode, e.g. "
            f"{training[0]!r}"
        )
    model = model if inplace else copy.deepcopy(model)
    folded = []
    with all_or_nothing(model) as undo:
        model, report = convert(model, inplace=True, return_report=True)
        walk = _Walk(model, trace_our_blocks=True, live_only=True)
        for module, graph in walk.graphs.items():
            for node in graph.nodes:
                call = _norm_call(module, node)
                if call is None:
                    continue
                bn_target, source = call
                conv_target = _fold_target(walk, module, bn_target, source)
                if conv_target is None:  # it stays as convert left it
                    continue
                bn = module.get_submodule(bn_target)
                _fold_into_conv(module.get_submodule(conv_target), bn, undo)
                parent, _, attr = bn_target.rpartition(".")
                setattr(module.get_submodule(parent), attr, _folded_replacement(bn))
                folded.append((walk.qualified(module, bn_target), walk.qualified(module, conv_target)))
    gone = {name for name, _ in folded}
    report.fused = [entry for entry in report.fused if entry[0] not in gone]
    report.left = [entry for entry in report.left if entry[0] not in gone]
    report.folded = folded
    return _finish(model, report, verbose, return_report)
