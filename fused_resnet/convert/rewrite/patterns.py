"""What a BatchNorm's output reaches in a graph: a ReLU, an add and then a ReLU, or the reason
it fuses with neither.

    y = relu(bn(x))             ->  BatchNormReLU*d(x)
    y = relu(bn(x) + r)         ->  BatchNormAddReLU*d(x, r)      (bn on either side)

The ReLU is nn.ReLU (inplace or not), F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu or
Tensor.relu_; the add +, +=, torch.add or Tensor.add(_) with alpha 1. An nn.Identity placeholder
(timm's drop_block, an unused anti-aliasing layer) may sit anywhere in between. Reads of a
value's shape, dtype or device are not uses of its values.

A reason starts with "cannot fuse:" when the computation itself has no fused form (the output is
needed on its own, or goes through an SE block or a SiLU) and with "not supported:" when it has
one that convert does not take (hooks, a shared module, an untraceable caller).
"""

import operator
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
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


def relu_input(node, module):
    """The value `node` applies a ReLU to, or None when `node` is not a ReLU."""
    if node.op == "call_module" and type(module.get_submodule(node.target)) is nn.ReLU:
        return node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        flags = list(node.args[1:]) + list(node.kwargs.values())  # F.relu's `inplace`
        if len(node.args) in (1, 2) and set(node.kwargs) <= {"inplace"}:
            return node.args[0] if all(isinstance(f, bool) for f in flags) else None
        return None
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return node.args[0] if len(node.args) == 1 and not node.kwargs else None
    return None


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


def is_placeholder_layer(node, module):
    """A call of an nn.Identity without hooks: the value passes through unchanged."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    target = module.get_submodule(node.target)
    return type(target) is nn.Identity and not hooked(target)


def describe(node, module):
    """`node` in words, for a reason."""
    if node.op == "call_module":
        return f"{node.target} ({type(module.get_submodule(node.target)).__name__})"
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
    output reaches a ReLU, or an add and then a ReLU."""

    node: torch.fx.Node
    relu: torch.fx.Node
    add: Optional[torch.fx.Node] = None
    residual: Optional[torch.fx.Node] = None
    bn_on_left: bool = True
    placeholders: List[torch.fx.Node] = field(default_factory=list)  # nn.Identity calls after it
    sum_placeholders: List[torch.fx.Node] = field(default_factory=list)  # ... after the add
    name: str = ""  # the BatchNorm's qualified name
    container: bool = False


REACHES_OUTPUT = "its output is the module's output"


def find_fusion(module, node, order):
    """A Fusion for the call `node` whose value is a BatchNorm's output, REACHES_OUTPUT when that
    value is what `module`'s forward returns (its caller decides), else the reason (a str)."""
    last, placeholders, users = follow(node, module)
    if len(users) != 1:
        return cannot(f"its output has {len(users)} uses") if users else cannot("its output is unused")
    user = users[0]
    if user.op == "output":
        return REACHES_OUTPUT if user.args[0] is last else cannot("its output is part of a returned tuple")
    found = Fusion(node=node, relu=user, placeholders=placeholders)
    if relu_input(user, module) is last:
        return found
    operands = add_operands(user)
    if operands is None:
        return cannot(f"its output goes to {describe(user, module)}, not to a ReLU or an add")
    left, right, in_place = operands
    if (left is last) == (right is last):
        return cannot("it is added to itself")
    found.bn_on_left = left is last
    found.residual = right if found.bn_on_left else left
    if not isinstance(found.residual, torch.fx.Node):
        return unsupported("it is added to a constant, not a tensor")
    if in_place and not found.bn_on_left:
        return unsupported("the add writes into the residual in place (r.add_(bn(x)) changes r)")
    sum_last, sum_placeholders, sum_users = follow(user, module)
    if len(sum_users) != 1 or any(len(n.users) != 1 for n in [user] + sum_placeholders):
        return cannot("the sum has other uses than the ReLU")
    if relu_input(sum_users[0], module) is not sum_last:
        return cannot(f"the sum goes to {describe(sum_users[0], module)}, not to a ReLU")
    between = [n for n in order if order[node] < order[n] < order[user]]
    if any(arg in n.all_input_nodes and not reads_metadata(n) for arg in node.all_input_nodes for n in between):
        return unsupported("its input is used again between the BatchNorm and the add")
    found.add, found.relu, found.sum_placeholders = user, sum_users[0], sum_placeholders
    return found
