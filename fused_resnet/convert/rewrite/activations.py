"""Which activations convert fuses into the BatchNorm (or the BatchNorm and add) before them, as
modules, functions and methods, and the name each has in contract.ACTIVATIONS:

    module                               function or method                               act
    nn.ReLU                              F.relu, F.relu_, torch.relu(_), x.relu(), x.relu_()  relu
    nn.ReLU6, nn.Hardtanh(0, 6)          F.relu6, F.hardtanh(x, 0, 6), F.hardtanh_(x, 0, 6)   relu6
    nn.LeakyReLU(s), s >= 0              F.leaky_relu(x, s), F.leaky_relu_(x, s), s >= 0      leaky_relu
    nn.SiLU                              F.silu                                               silu
    nn.Hardswish                         F.hardswish                                          hardswish
    nn.GELU(), timm's GELU               F.gelu(x)                                            gelu
    nn.GELU(approximate="tanh"),         F.gelu(x, approximate="tanh")                        gelu_tanh
      timm's GELUTanh

in place or not: the fused module writes a new tensor, and the BatchNorm's output it replaces
had no other reader, so no one saw the in-place update. The fused op computes each as eager
computes it (docs/design.md, "Activations"); nn.Hardtanh(0, 6) is nn.ReLU6's own computation.

The other activations (ELU, Mish, sigmoid, tanh, PReLU, a LeakyReLU with a negative slope, a
Hardtanh with other bounds, ...) have no fused form: the reason names them. A LeakyReLU slope
below 0 is refused by the op contract, since the backward tells the side of the kink from the
output's sign.
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ...contract import DEFAULT_NEGATIVE_SLOPE


@dataclass(frozen=True)
class Activation:
    """One of contract.ACTIVATIONS, with its slope for leaky_relu."""

    act: str
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE

    def __str__(self):
        return f"{self.act}({self.negative_slope})" if self.act == "leaky_relu" else self.act


IDENTITY = Activation("identity")

# What a call of an activation gives: the Activation, or why it has no fused form (a clause that
# follows the activation's description: "its output goes to act (ELU), which is not fused").
Found = Union[Activation, str]

NOT_FUSED = "which is not fused"


class Unsupported(str):
    """A clause of a reason that starts "not supported:" (a fused form exists, convert does not
    take it: the activation module has hooks, its arguments are not constants); any other clause
    starts "cannot fuse:"."""

# Modules, by exact class: a subclass may compute something else.
_MODULES = {
    nn.ReLU: lambda m: Activation("relu"),
    nn.ReLU6: lambda m: Activation("relu6"),
    nn.Hardtanh: lambda m: _hardtanh(m.min_val, m.max_val),
    nn.LeakyReLU: lambda m: _leaky_relu(m.negative_slope),
    nn.SiLU: lambda m: Activation("silu"),
    nn.Hardswish: lambda m: Activation("hardswish"),
    nn.GELU: lambda m: _gelu(m.approximate),
}
# timm's activation layers that call F.gelu themselves (timm.layers.activations), by where they
# are defined, so that timm is not imported.
_TIMM_MODULES = {
    ("timm.layers.activations", "GELU"): lambda m: Activation("gelu"),
    ("timm.layers.activations", "GELUTanh"): lambda m: Activation("gelu_tanh"),
}
_TIMM_ACTIVATIONS = ("timm.layers.activations", "timm.layers.activations_me")

# Functions: (the activation of the bound arguments, the parameters after the input with their
# defaults). F.relu_ is torch.relu_, F.gelu a builtin: the graph's target is the object itself.
_FUNCTIONS = {
    F.relu: (lambda a: Activation("relu"), {"inplace": False}),
    torch.relu: (lambda a: Activation("relu"), {}),
    torch.relu_: (lambda a: Activation("relu"), {}),
    F.relu6: (lambda a: Activation("relu6"), {"inplace": False}),
    F.hardtanh: (lambda a: _hardtanh(a["min_val"], a["max_val"]), {"min_val": -1.0, "max_val": 1.0, "inplace": False}),
    F.hardtanh_: (lambda a: _hardtanh(a["min_val"], a["max_val"]), {"min_val": -1.0, "max_val": 1.0}),
    F.leaky_relu: (lambda a: _leaky_relu(a["negative_slope"]), {"negative_slope": 0.01, "inplace": False}),
    F.leaky_relu_: (lambda a: _leaky_relu(a["negative_slope"]), {"negative_slope": 0.01}),
    F.silu: (lambda a: Activation("silu"), {"inplace": False}),
    F.hardswish: (lambda a: Activation("hardswish"), {"inplace": False}),
    F.gelu: (lambda a: _gelu(a["approximate"]), {"approximate": "none"}),
}
_METHODS = {"relu": _FUNCTIONS[torch.relu], "relu_": _FUNCTIONS[torch.relu_]}

# Elementwise activations with no fused form, named in the reason.
_OTHER_FUNCTIONS = (
    F.elu, F.elu_, F.selu, torch.selu_, F.celu, torch.celu_, F.mish, F.hardsigmoid, F.sigmoid, torch.sigmoid,
    torch.sigmoid_, F.tanh, torch.tanh, torch.tanh_, F.softplus, F.logsigmoid, F.prelu, F.rrelu, torch.rrelu_,
    F.threshold, torch.threshold_, F.softsign, F.tanhshrink, F.hardshrink, F.softshrink,
)  # fmt: skip
_OTHER_METHODS = ("sigmoid", "sigmoid_", "tanh", "tanh_")
_OTHER_MODULES = (
    nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.LogSigmoid,
    nn.PReLU, nn.RReLU, nn.Threshold, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
)  # fmt: skip


def _hardtanh(min_val, max_val) -> Found:
    if min_val == 0 and max_val == 6:
        return Activation("relu6")
    return f"whose bounds ({min_val}, {max_val}) are not (0, 6), {NOT_FUSED}"


def _leaky_relu(negative_slope) -> Found:
    if negative_slope >= 0:
        return Activation("leaky_relu", float(negative_slope))
    return (
        f"whose negative_slope {negative_slope} is below 0, which the fused op does not take (its "
        "backward tells the side of the kink from the output's sign)"
    )


def _gelu(approximate) -> Found:
    if approximate in ("none", "tanh"):
        return Activation("gelu" if approximate == "none" else "gelu_tanh")
    return f"with approximate={approximate!r}, {NOT_FUSED}"


def _key(cls):
    return cls.__module__, cls.__qualname__


def module_activation(module: nn.Module) -> Optional[Found]:
    """What the module `module` applies: an Activation, why it has no fused form (a clause), or
    None when it is no activation (a BatchNorm's output going there is described otherwise)."""
    cls = type(module)
    if cls in _MODULES:
        return _MODULES[cls](module)
    if _key(cls) in _TIMM_MODULES:
        return _TIMM_MODULES[_key(cls)](module)
    if cls in _OTHER_MODULES or cls.__module__ in _TIMM_ACTIVATIONS:
        return NOT_FUSED
    return None


def _bind(node, parameters):
    """{parameter: value} of a call_function/call_method node past its input, with the defaults;
    None when an argument is not one of the parameters or not a constant."""
    names = list(parameters)
    if len(node.args) - 1 > len(names) or set(node.kwargs) - set(names):
        return None
    bound = dict(parameters)
    bound.update(zip(names, node.args[1:]))
    bound.update(node.kwargs)
    if any(isinstance(v, torch.fx.Node) for v in bound.values()):
        return None
    return bound


def applied_activation(node: torch.fx.Node, module: nn.Module):
    """(the value `node` applies an activation to, what it applies: an Activation or why it has
    no fused form), or None when `node` applies no activation. `module` is the graph's owner."""
    if node.op == "call_module":
        target = module.get_submodule(node.target)
        found = module_activation(target)
        if found is None or len(node.args) != 1 or node.kwargs:
            return None
        hooked = target._forward_hooks or target._forward_pre_hooks or target._backward_hooks
        if isinstance(found, Activation) and hooked:
            return node.args[0], Unsupported("which has hooks, which would not see the fused computation")
        return node.args[0], found
    if node.op == "call_function" and node.target in _FUNCTIONS:
        rule, parameters = _FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _METHODS:
        rule, parameters = _METHODS[node.target]
    elif (node.op == "call_function" and node.target in _OTHER_FUNCTIONS) or (
        node.op == "call_method" and node.target in _OTHER_METHODS
    ):
        return (node.args[0], NOT_FUSED) if node.args else None
    else:
        return None
    if not node.args:
        return None
    bound = _bind(node, parameters)
    if bound is None:
        return node.args[0], Unsupported("whose arguments convert cannot read (not constants, or not its own)")
    return node.args[0], rule(bound)
