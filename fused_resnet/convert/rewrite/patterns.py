"""What a BatchNorm's output reaches in a graph: an activation, an add (and then an activation,
or none), or the reason it fuses with neither.

    y = act(bn(x))              ->  BatchNormReLU*d(x), BatchNormAct*d(x, act=...)
    y = act(bn(x) + r)          ->  BatchNormAddReLU*d(x, r), BatchNormAddAct*d(x, r, act=...)
    y = bn(x) + r               ->  BatchNormAddAct*d(x, r, act="identity")   (bn on either side)

The activations are those of rewrite/activations.py, as modules, functions or methods, in place
or not; the add +, +=, torch.add or Tensor.add(_) with alpha 1. An add is fused with the
activation that is the sum's only use, else with none (the inverted residuals of MobileNet and
EfficientNet: the sum is the block's output): the fused module's output is the sum itself. An
nn.Identity placeholder (timm's drop_block or an inactive drop_path, an unused anti-aliasing
layer), or a stochastic depth that drops nothing (timm's DropPath(0.), torchvision's
StochasticDepth(0.)), may sit anywhere in between. Reads of a value's shape, dtype or device
are not uses of its values.

A reason starts with "cannot fuse:" when the computation itself has no fused form (the output is
needed on its own, or goes through an SE block or an ELU) and with "not supported:" when it has
one that convert does not take (hooks, a shared module, an untraceable caller).
"""

import operator
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.fx
from torch import nn

from .activations import IDENTITY, Activation, Unsupported, applied_activation


_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
_METADATA_METHODS = ("size", "dim", "numel")
_METADATA_ATTRIBUTES = ("shape", "dtype", "device", "ndim", "is_cuda")


def cannot(why):
    return f"cannot fuse: {why}"


def unsupported(why):
    return f"not supported: {why}"


def hooked(module):
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


# ---------------------------------------------------------------------------------------------
# Nodes.


def add_operands(node):
    """(left, right, writes_left_in_place) when `node` adds two things with alpha 1, else None."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        in_place = node.target is operator.iadd  # a graph's iadd (torch.fx traces `+=` as add)
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        in_place = node.target == "add_"
    else:
        return None
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"} or node.kwargs.get("alpha", 1) != 1:
        return None
    return node.args[0], node.args[1], in_place


def reads_metadata(node):
    """True when `node` reads only its input's shape, dtype or device, never the values: the
    same for a BatchNorm's output as for its input."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) == 2
        and node.args[1] in _METADATA_ATTRIBUTES
    )


# Stochastic depth that drops nothing returns its input in both modes: timm's DropPath (its
# forward: drop_path(x, drop_prob, ...), which returns x when drop_prob is 0) and torchvision's
# StochasticDepth (stochastic_depth(input, p, ...), x when p is 0), by exact class and where they
# are defined, so that neither library is imported. Like an nn.Identity, its call leaves the
# graph with the fusion: a rate set after convert is not applied (convert the model again).
_INACTIVE_WHEN_ZERO = {
    ("timm.layers.drop", "DropPath"): "drop_prob",
    ("torchvision.ops.stochastic_depth", "StochasticDepth"): "p",
}


def _passes_through(layer):
    if type(layer) is nn.Identity:
        return True
    probability = _INACTIVE_WHEN_ZERO.get((type(layer).__module__, type(layer).__qualname__))
    return probability is not None and getattr(layer, probability, None) == 0


def is_placeholder_layer(node, module):
    """A call of an nn.Identity, or of a stochastic depth that drops nothing, without hooks: the
    value passes through unchanged."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    target = module.get_submodule(node.target)
    return _passes_through(target) and not hooked(target)


def describe(node, module, prefix=""):
    """`node` in words, for a reason; a submodule by its qualified name (`prefix` is `module`'s)."""
    if node.op == "call_module":
        name = f"{prefix}.{node.target}" if prefix else node.target
        return f"{name} ({type(module.get_submodule(node.target)).__name__})"
    if node.op == "output":
        return "the output"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
    return f"{target}"


def follow(node, module):
    """(last, placeholders, users): from `node` through the nn.Identity calls that are its only
    use, the last value, those calls, and the uses of `last` that read its values."""
    placeholders = []
    while True:
        users = [u for u in node.users if not reads_metadata(u)]
        if len(users) == 1 and is_placeholder_layer(users[0], module):
            node = users[0]
            placeholders.append(node)
            continue
        return node, placeholders, users


# ---------------------------------------------------------------------------------------------
# One fusion.


@dataclass
class Fusion:
    """A BatchNorm call (or the call of a container whose graph ends in one: `container`) whose
    output reaches an activation, or an add and then an activation or none (IDENTITY)."""

    node: torch.fx.Node
    activation: Activation
    act_node: Optional[torch.fx.Node]  # the call of the activation; None for IDENTITY after an add
    add: Optional[torch.fx.Node] = None
    residual: Optional[torch.fx.Node] = None
    bn_on_left: bool = True
    placeholders: List[torch.fx.Node] = field(default_factory=list)  # nn.Identity calls after it
    sum_placeholders: List[torch.fx.Node] = field(default_factory=list)  # ... after the add
    name: str = ""  # the BatchNorm's qualified name
    container: bool = False


REACHES_OUTPUT = "its output is the module's output"


def _no_fusion(what, clause):
    """The reason for `what` (\"its output goes to act (ELU)\") followed by an activation's clause."""
    why = f"{what}, {clause}"
    return unsupported(why) if isinstance(clause, Unsupported) else cannot(why)


def find_fusion(module, node, order, prefix=""):
    """A Fusion for the call `node` whose value is a BatchNorm's output, REACHES_OUTPUT when that
    value is what `module`'s forward returns (its caller decides), else the reason (a str), which
    names submodules by their qualified names (`prefix` is `module`'s)."""
    last, placeholders, users = follow(node, module)
    if len(users) != 1:
        return cannot(f"its output has {len(users)} uses") if users else cannot("its output is unused")
    user = users[0]
    if user.op == "output":
        return REACHES_OUTPUT if user.args[0] is last else cannot("its output is part of a returned tuple")
    applied = applied_activation(user, module)
    if applied is not None and applied[0] is last:
        if isinstance(applied[1], Activation):
            return Fusion(node=node, activation=applied[1], act_node=user, placeholders=placeholders)
        return _no_fusion(f"its output goes to {describe(user, module, prefix)}", applied[1])
    operands = add_operands(user)
    if operands is None:
        return cannot(f"its output goes to {describe(user, module, prefix)}, not to an activation or an add")
    found = Fusion(node=node, activation=IDENTITY, act_node=None, add=user, placeholders=placeholders)
    left, right, in_place = operands
    if (left is last) == (right is last):
        return cannot("it is added to itself")
    found.bn_on_left = left is last
    found.residual = right if found.bn_on_left else left
    if not isinstance(found.residual, torch.fx.Node):
        return unsupported("it is added to a constant, not a tensor")
    if in_place and not found.bn_on_left:
        return unsupported("the add writes into the residual in place (r.add_(bn(x)) changes r)")
    between = [n for n in order if order[node] < order[n] < order[user]]
    if any(arg in n.all_input_nodes and not reads_metadata(n) for arg in node.all_input_nodes for n in between):
        return unsupported("its input is used again between the BatchNorm and the add")
    # The activation that is the sum's only use joins the fusion; else the fused module's output
    # is the sum, for all its readers.
    sum_last, sum_placeholders, sum_users = follow(user, module)
    if len(sum_users) == 1 and all(len(n.users) == 1 for n in [user] + sum_placeholders):
        applied = applied_activation(sum_users[0], module)
        if applied is not None and applied[0] is sum_last and isinstance(applied[1], Activation):
            found.activation, found.act_node, found.sum_placeholders = applied[1], sum_users[0], sum_placeholders
    return found
