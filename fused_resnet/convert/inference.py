"""optimize_for_inference: fold each eval-mode BatchNorm into the convolution that feeds it, and
fuse the rest with convert.

Folding (W' = W * g / sqrt(var + eps) per output channel, b' = (b - mean) * g / sqrt(var + eps)
+ beta) needs a Conv1d/2d/3d, or a subclass that keeps their forward (torchvision's
Conv3DSimple), whose output only the BatchNorm reads; frozen BatchNorms (torchvision's, timm's)
fold the same way. A folded BatchNorm becomes nn.Identity, a folded BatchNormReLU*d an nn.ReLU, a
folded BatchNormAddReLU*d an AddReLU (the fused kernel with identity statistics), a folded timm
(Frozen)BatchNormAct2d its activation; an eager BatchNorm followed by add + ReLU keeps its eager
add + ReLU.
"""

import copy

import torch
import torch.fx
from torch import nn

from .fuse import FUSED_NORMS, _bn_add_relu, _check_module, _finish, _resolve, _Walk, convert
from ..nn.batchnorm import AddReLU, _BatchNormAddAct, _BatchNormAct
from .rewrite import norms
from .rewrite.undo import all_or_nothing

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


def _folded_replacement(bn):
    if isinstance(bn, _BatchNormAddAct):
        return AddReLU()
    if isinstance(bn, _BatchNormAct):
        return nn.ReLU()
    if norms.norm_kind(bn) in (norms.PLAIN, norms.APPLIES_RELU) and hasattr(bn, "act"):
        return bn.act  # timm's (Frozen)BatchNormAct2d: what remains is its activation
    return nn.Identity()


def _foldable(norm):
    return norms.norm_kind(norm) in (norms.PLAIN, norms.APPLIES_RELU) or isinstance(norm, FUSED_NORMS)


def _norm_call(module, node):
    """(norm target, input node) when `node` applies a BatchNorm (eager or fused): a call of the
    module, or a call of _bn_add_relu that convert() generated; else None."""
    if node.op == "call_module":
        norm, source = _resolve(module, node.target), node.args[0] if node.args else None
        target = node.target
    elif node.op == "call_function" and node.target is _bn_add_relu and node.args[0].op == "get_attr":
        target, source = node.args[0].target, node.args[1]
        norm = _resolve(module, target)
    else:
        return None
    return (target, source) if _foldable(norm) else None


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
    """An inference copy of the eval-mode `model`: BatchNorms folded into the convolutions that
    feed them, the rest fused (see the module docstring). The input model is left as it is
    unless inplace=True, and as it was if that fails. Refuses a model with any module in
    training mode."""
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
        walk = _Walk(model, trace_our_blocks=True)
        for module, graph in walk.graphs.items():
            for node in graph.nodes:
                call = _norm_call(module, node)
                if call is None:
                    continue
                bn_target, source = call
                conv_target = _fold_target(walk, module, bn_target, source)
                if conv_target is None:  # convert fuses it, or leaves it with the reason
                    continue
                bn = module.get_submodule(bn_target)
                _fold_into_conv(module.get_submodule(conv_target), bn, undo)
                parent, _, attr = bn_target.rpartition(".")
                setattr(module.get_submodule(parent), attr, _folded_replacement(bn))
                folded.append((walk.qualified(module, bn_target), walk.qualified(module, conv_target)))
        model, report = convert(model, inplace=True, return_report=True)
    report.folded = folded
    return _finish(model, report, verbose, return_report)
