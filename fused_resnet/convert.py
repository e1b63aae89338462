"""Rewrite existing models to use the fused modules: `convert` for training, `optimize_for_inference`.

convert(model) finds, in every module's forward:
    y = relu(bn(x))             ->  y = BatchNormReLU*d(x)              (bn's only use is the ReLU)
    y = relu(bn(x) + r)         ->  y = BatchNormAddReLU*d(x, r)        (bn on either side, +, +=,
                                                                         torch.add, Tensor.add(_))
with the ReLU as nn.ReLU (inplace or not), F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu
or Tensor.relu_. The BatchNorm object itself becomes the fused module (fuse_batchnorm_: only its
class changes), so its qualified name, parameters, buffers, settings, mode, device and dtype stay
and state dicts load strictly in both directions.

How a module is analysed: each module that calls a BatchNorm is traced with torch.fx on its own,
every submodule a leaf, in both train and eval mode (a forward that branches on self.training is
left alone). Where a fusion applies, the module keeps its class and gets, on the instance, the
forward that torch.fx generates from the rewritten graph. A module that does not trace (data-
dependent control flow, say) does not stop the others: its submodules are analysed on their own,
and the known residual blocks (this package's, torchvision's BasicBlock/Bottleneck) are converted
from their known dataflow. Whatever is not fused is listed, with the reason, in the report.

What the rewrite never does: fuse a BatchNorm whose output has another use, that is shared or called
twice, that has forward hooks, or whose add writes into the residual in place (`r += bn(x)`
modifies r). torch.fx records `a += b` as `a = a + b`; a module whose forward applies an operator
to a tensor that is an input, an attribute, or used again afterwards is left as it is, because
regenerating its code could drop an in-place update another reader sees.

optimize_for_inference(model) folds each eval-mode BatchNorm into the Conv1d/2d/3d that feeds it
(W' = W * g / sqrt(var + eps) per output channel, b' = (b - mean) * g / sqrt(var + eps) + beta)
and converts the BatchNorms that cannot fold. A folded BatchNorm becomes nn.Identity, a folded
BatchNormReLU*d an nn.ReLU, and a folded BatchNormAddReLU*d an AddReLU (the fused kernel with
identity statistics); an eager BatchNorm followed by add + ReLU keeps its eager add + ReLU.
"""

import copy
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .nn.batchnorm import (
    EAGER_BATCHNORMS,
    AddReLU,
    _BatchNormAddReLU,
    _BatchNormReLU,
    fuse_batchnorm_,
)
from .nn.blocks import BasicBlock, Bottleneck
from .nn.syncbn import convert_sync_batchnorm

_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")
# Python operators that torch.fx records out of place even when written augmented (`a op= b`).
_BINARY_OPERATORS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
    operator.pow, operator.matmul, operator.and_, operator.or_, operator.xor, operator.lshift,
    operator.rshift,
)  # fmt: skip
_METADATA_METHODS = ("size", "dim", "numel")
_METADATA_ATTRIBUTES = ("shape", "dtype", "device", "ndim", "is_cuda")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_FUSED_NORMS = (_BatchNormReLU, _BatchNormAddReLU)
_FOLDABLE_NORMS = EAGER_BATCHNORMS + _FUSED_NORMS


@dataclass
class ConversionReport:
    """What convert / optimize_for_inference did, by qualified module name."""

    fused: List[Tuple[str, str]] = field(default_factory=list)  # (BatchNorm, fused class)
    folded: List[Tuple[str, str]] = field(default_factory=list)  # (BatchNorm, convolution)
    left: List[Tuple[str, str]] = field(default_factory=list)  # (BatchNorm, why not)
    untraced: List[Tuple[str, str]] = field(default_factory=list)  # (module, torch.fx's error)

    def __str__(self):
        lines = []
        sections = (
            ("fused", self.fused, "->"),
            ("folded into the preceding convolution", self.folded, "->"),
            ("left as they are", self.left, ":"),
            ("modules torch.fx could not trace", self.untraced, ":"),
        )
        for title, entries, sep in sections:
            if entries:
                lines.append(f"{title} ({len(entries)}):")
                lines += [f"  {name or '<model>'} {sep} {what}" for name, what in entries]
        return "\n".join(lines) if lines else "no BatchNorm found"


class NotRewritable(Exception):
    """Why a module's forward cannot be analysed or regenerated."""


# ---------------------------------------------------------------------------------------------
# The forward installed on a rewritten module.


def _refuse_pickle(self, protocol):
    raise TypeError(
        f"fused_resnet.convert: a converted {type(self).__name__} cannot be pickled whole (its "
        "forward was regenerated by torch.fx); save its state_dict and call fused_resnet.convert "
        "again after loading"
    )


def _copy_module(self):
    copied = object.__new__(type(self))
    copied.__dict__.update(self.__dict__)
    return copied


def _deepcopy_module(self, memo):
    copied = object.__new__(type(self))
    memo[id(self)] = copied
    copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
    return copied


def install_forward(module, forward, graph):
    """Give `module` the new `forward` through a subclass made for it, as torch.fx's GraphModule
    does: the module keeps its attributes, hooks and isinstance, and copies (copy.deepcopy,
    DataParallel replicas) call the forward with themselves as `self`. `graph` is the rewritten
    graph, kept for optimize_for_inference."""
    base = type(module)
    while getattr(base, "_fused_resnet_graph", False) is not False:  # rewritten before
        base = base.__bases__[0]
    namespace = {
        "forward": forward,
        "_fused_resnet_graph": graph,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__reduce_ex__": _refuse_pickle,
        "__copy__": _copy_module,
        "__deepcopy__": _deepcopy_module,
    }
    module.__class__ = type(base.__name__, (base,), namespace)


def _is_rewritten(module):
    return getattr(type(module), "_fused_resnet_graph", False) is not False


def _bn_add_relu(bn, input, residual, bn_on_left):
    """relu(bn(input) + residual) in one kernel when the residual has the BatchNorm output's
    shape, dtype and device; otherwise (a broadcast or promoting add) exactly as the original."""
    if (
        isinstance(residual, torch.Tensor)
        and residual.shape == input.shape
        and residual.dtype == input.dtype
        and residual.device == input.device
    ):
        return bn(input, residual)
    if isinstance(bn, AddReLU):  # optimize_for_inference folded the normalization away
        out = input
    else:
        eager_class = next(c for c in type(bn).__mro__ if c in EAGER_BATCHNORMS)
        out = eager_class.forward(bn, input)
    return torch.relu(out + residual if bn_on_left else residual + out)


# ---------------------------------------------------------------------------------------------
# Tracing one module.


class _Undecided(Exception):
    """The trace reached a branch on a traced value that has no decision yet."""


class _ShallowTracer(torch.fx.Tracer):
    """Traces one module's own forward: every submodule call is a leaf call_module node.

    A branch on a traced value (`if x.size() != out.size(): raise ...`, `assert x.dim() == 4`)
    takes the value in `decisions`, and the graph gets a node that raises the same error at run
    time when the condition takes the other value (_trace_through_raises picks them)."""

    def __init__(self, decisions=()):
        super().__init__()
        self.decisions = list(decisions)
        self.branches = 0

    def is_leaf_module(self, m, module_qualified_name):
        return True

    def to_bool(self, obj):
        if self.branches >= len(self.decisions):
            raise _Undecided()
        value, error = self.decisions[self.branches]
        self.branches += 1
        if error is not None:  # None while _trace_through_raises explores a branch
            self.create_proxy("call_function", _branch_guard(not value, error), (obj,), {})
        return value


def _branch_guard(raising_value, error):
    """A graph function that raises `error` again when the condition is `raising_value`."""
    error_type, error_args = type(error), error.args

    def raise_if(condition):
        if bool(condition) == raising_value:
            raise error_type(*error_args)

    return raise_if


def _raised_by(error, function):
    """True when `error` was raised by `function`'s own code (a `raise` or `assert` in it)."""
    frame = error.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    return frame.tb_frame.f_code is function.__code__


def _trace_through_raises(module, max_branches=16):
    """The graph of the path through `module`'s forward on which no branch raises, each branch
    on a traced value checked at run time; NotRewritable if a branch goes on both ways."""
    decisions = []
    while True:
        try:
            return _ShallowTracer(decisions).trace(module)
        except _Undecided:
            pass
        if len(decisions) == max_branches:
            raise NotRewritable(f"its forward branches on traced values more than {max_branches} times")
        raising = {}
        for value in (False, True):
            try:
                _ShallowTracer(decisions + [(value, None)]).trace(module)
            except _Undecided:
                pass
            except Exception as error:  # noqa: BLE001  (the forward's own error)
                if _raised_by(error, type(module).forward):
                    raising[value] = error
        if len(raising) != 1:
            raise NotRewritable(
                "its forward branches on a traced value (data-dependent control flow)"
            )
        raising_value, error = next(iter(raising.items()))
        decisions.append((not raising_value, error))


def _module_graph(module):
    """The torch.fx graph of `module`'s forward; raises NotRewritable when there is none."""
    if _is_rewritten(module):
        if type(module)._fused_resnet_graph is None:
            raise NotRewritable("its forward is a known block's")
        return type(module)._fused_resnet_graph
    if "forward" in module.__dict__:
        raise NotRewritable("its forward is set on the instance")
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        raise NotRewritable(f"{type(module).__name__} has no forward")
    graphs = []
    training = module.training
    try:
        for mode in (training, not training):
            module.training = mode
            graphs.append(_trace_through_raises(module))
    except NotRewritable:
        raise
    except Exception as error:  # noqa: BLE001  (torch.fx raises many kinds)
        raise NotRewritable(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    finally:
        module.training = training
    if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
        raise NotRewritable("its forward depends on self.training")
    return graphs[0]


def _ambiguous_operator(graph):
    """A node `a op b` that might have been `a op= b` with a reader of the old `a`, or None."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in _BINARY_OPERATORS:
            continue
        left = node.args[0]
        if not isinstance(left, torch.fx.Node):
            continue
        if left.op in ("placeholder", "get_attr") or any(order[u] > order[node] for u in left.users):
            return node
    return None


# ---------------------------------------------------------------------------------------------
# Finding the patterns in a graph.


def _relu_input(node, module):
    """The tensor `node` applies a ReLU to, or None when `node` is not a ReLU."""
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


def _add_operands(node):
    """(left, right, writes_left_in_place) when `node` adds two things with alpha 1, else None."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        in_place = False
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        in_place = node.target == "add_"
    else:
        return None
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"} or node.kwargs.get("alpha", 1) != 1:
        return None
    return node.args[0], node.args[1], in_place


class _Candidate:
    """One BatchNorm call in a graph, and what can be done with it."""

    def __init__(self, module, node):
        self.module, self.node = module, node
        self.relu = self.add = self.residual = None
        self.bn_on_left = True


def _reads_metadata(node):
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


def _find_fusion(module, node, order):
    """A _Candidate for the BatchNorm call `node`, or the reason it does not fuse (a str)."""
    if len(node.args) != 1 or node.kwargs:
        return "called with more than one argument"
    users = [u for u in node.users if not _reads_metadata(u)]
    if len(users) != 1:
        return f"its output has {len(users)} uses" if users else "its output is unused"
    user = users[0]
    found = _Candidate(module, node)
    if _relu_input(user, module) is node:
        found.relu = user
        return found
    operands = _add_operands(user)
    if operands is None:
        return f"its output goes to {_describe(user)}, not a ReLU or an add"
    left, right, in_place = operands
    if (left is node) == (right is node):
        return "it is added to itself" if left is node else f"its output goes to {_describe(user)}"
    found.bn_on_left = left is node
    found.residual = right if found.bn_on_left else left
    if not isinstance(found.residual, torch.fx.Node):
        return "it is added to a constant, not a tensor"
    if in_place and not found.bn_on_left:
        return "the add writes into the residual in place (r.add_(bn(x)) changes r)"
    sum_users = list(user.users)
    if len(sum_users) != 1 or _relu_input(sum_users[0], module) is not user:
        return "the sum is not used by a ReLU alone"
    bn_input = node.args[0]
    between = [n for n in order if order[node] < order[n] < order[user]]
    if any(bn_input in n.all_input_nodes and not _reads_metadata(n) for n in between):
        return "its input is used again between the BatchNorm and the add"
    found.add, found.relu = user, sum_users[0]
    return found


def _describe(node):
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
    return f"{node.op} {target}"


# ---------------------------------------------------------------------------------------------
# The model walk shared by convert and optimize_for_inference.


class _Walk:
    """The modules of a model, their graphs, and who calls which BatchNorm."""

    def __init__(self, model, report, trace_our_blocks):
        self.model, self.report = model, report
        self.names = {m: n for n, m in model.named_modules()}
        self.owners = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.graphs = {}  # module -> graph
        self.untraceable = []
        self.calls = Counter()  # id(submodule) -> nodes that call or fetch it, over all graphs
        for name, module in model.named_modules():
            if isinstance(module, _FOLDABLE_NORMS) or (_is_our_block(module) and not trace_our_blocks):
                continue
            if not any(isinstance(m, _FOLDABLE_NORMS) for m in module.modules()):
                continue
            try:
                graph = _module_graph(module)
            except NotRewritable as why:
                if not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
                    report.untraced.append((name, str(why)))
                    self.untraceable.append(module)
                continue
            self.graphs[module] = graph
            for node in graph.nodes:
                if node.op in ("call_module", "get_attr"):
                    target = _resolve(module, node.target)
                    if isinstance(target, nn.Module):
                        self.calls[id(target)] += 1

    def qualified(self, module, target):
        prefix = self.names[module]
        return f"{prefix}.{target}" if prefix else target

    def why_not_alone(self, bn):
        """Why `bn` cannot change kind without others noticing, or None."""
        if self.owners[id(bn)] > 1:
            return "the module is shared (registered under several names)"
        if self.calls[id(bn)] > 1:
            return "it is called more than once"
        if bn._forward_hooks or bn._forward_pre_hooks or bn._backward_hooks:
            return "it has forward/backward hooks, which would see the fused output"
        return None


def _resolve(module, target):
    try:
        return module.get_submodule(target)
    except AttributeError:
        return None


def _is_our_block(module):
    """This package's blocks: their forward adapts to fused norms by itself (norm_relu, ...)."""
    return type(module).forward in (BasicBlock.forward, Bottleneck.forward) and (
        "forward" not in module.__dict__
    ) and not _is_rewritten(module)


_TORCHVISION_BLOCKS = {"BasicBlock.forward": "bn2", "Bottleneck.forward": "bn3"}


def _known_block_layout(module):
    """[(norm attribute, takes the residual)] for the blocks whose dataflow is known: this
    package's, and torchvision's BasicBlock/Bottleneck (recognized by their own, unmodified
    forward and their attributes)."""
    forward = type(module).forward
    if _is_our_block(module):
        last = "bn3" if isinstance(module, Bottleneck) else "bn2"
    elif getattr(forward, "__module__", "") == "torchvision.models.resnet" and not _is_rewritten(
        module
    ):
        last = _TORCHVISION_BLOCKS.get(getattr(forward, "__qualname__", ""))
        needed = ("conv1", "bn1", "conv2", "bn2", "relu", "downsample") + (
            ("conv3", "bn3") if last == "bn3" else ()
        )
        if last is None or not all(hasattr(module, a) for a in needed):
            return None
    else:
        return None
    relu_norms = ["bn1", "bn2"] if last == "bn3" else ["bn1"]
    return [(attr, False) for attr in relu_norms] + [(last, True)]


def _convert_known_block(walk, module):
    layout = _known_block_layout(module)
    name = walk.names[module]
    for attr, with_residual in layout:
        bn = getattr(module, attr)
        qualified = f"{name}.{attr}" if name else attr
        if type(bn) not in EAGER_BATCHNORMS:
            continue
        reason = walk.why_not_alone(bn)
        if reason:
            walk.report.left.append((qualified, reason))
            continue
        fuse_batchnorm_(bn, with_residual)
        walk.report.fused.append((qualified, type(bn).__name__))
    if not _is_our_block(module):  # torchvision's: run our forward, which has its dataflow
        function = Bottleneck.forward if layout[-1][0] == "bn3" else BasicBlock.forward
        install_forward(module, function, None)


def _rewrite(walk, module, graph):
    """Fuse the BatchNorm calls of `module`'s graph and install the regenerated forward."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    found = []
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        bn = module.get_submodule(node.target)
        if type(bn) not in EAGER_BATCHNORMS:
            continue
        name = walk.qualified(module, node.target)
        reason = walk.why_not_alone(bn)
        result = reason or _find_fusion(module, node, order)
        if isinstance(result, str):
            walk.report.left.append((name, result))
        else:
            found.append((name, result))
    if not found:
        return
    ambiguous = _ambiguous_operator(graph)
    if ambiguous is not None:
        reason = (
            f"the forward of {walk.names[module] or 'the model'} applies {_describe(ambiguous)} to a "
            "tensor read elsewhere, and torch.fx cannot tell `a += b` from `a = a + b`"
        )
        walk.report.left += [(name, reason) for name, _ in found]
        return
    for name, fusion in found:
        node, bn = fusion.node, module.get_submodule(fusion.node.target)
        for reader in [u for u in node.users if _reads_metadata(u)]:
            reader.replace_input_with(node, node.args[0])
        if fusion.add is None:
            fusion.relu.replace_all_uses_with(node)
            graph.erase_node(fusion.relu)
        else:
            # Read the residual now: an earlier fusion may have replaced the node it was.
            left, right, _ = _add_operands(fusion.add)
            residual = right if fusion.bn_on_left else left
            with graph.inserting_before(fusion.add):
                bn_attr = graph.get_attr(node.target)
                fused = graph.call_function(
                    _bn_add_relu, (bn_attr, node.args[0], residual, fusion.bn_on_left)
                )
            fusion.relu.replace_all_uses_with(fused)
            for dead in (fusion.relu, fusion.add, node):
                graph.erase_node(dead)
        fuse_batchnorm_(bn, with_residual=fusion.add is not None)
        walk.report.fused.append((name, type(bn).__name__))
    graph.lint()
    graph_module = torch.fx.GraphModule(module, graph)
    install_forward(module, type(graph_module).forward, graph)


def _check_sync(sync_batchnorm, process_group):
    if process_group is not None and not sync_batchnorm:
        raise ValueError("fused_resnet.convert: process_group is only used with sync_batchnorm=True")


def _finish(model, report, verbose, return_report):
    if verbose:
        print(report)  # asked for by the caller
    return (model, report) if return_report else model


def convert(
    model: nn.Module,
    inplace: bool = False,
    verbose: bool = False,
    return_report: bool = False,
    sync_batchnorm: bool = False,
    process_group=None,
):
    """Replace BatchNorm + ReLU and BatchNorm + add + ReLU in `model` by the fused modules.

    Returns the converted model (a deep copy unless inplace=True), or (model, ConversionReport)
    with return_report=True; verbose=True prints the report. The result computes what `model`
    computes and has the same state_dict keys.

    sync_batchnorm=True then makes every BatchNorm synchronized over `process_group` (default:
    the whole world) with fused_resnet.nn.convert_sync_batchnorm: the fused modules become
    SyncBatchNormReLU / SyncBatchNormAddReLU, the BatchNorms left unfused nn.SyncBatchNorm.
    """
    _check_sync(sync_batchnorm, process_group)
    if not isinstance(model, nn.Module):
        raise TypeError(f"fused_resnet.convert: expected an nn.Module, got {type(model).__name__}")
    model = model if inplace else copy.deepcopy(model)
    report = ConversionReport()
    walk = _Walk(model, report, trace_our_blocks=False)
    for module, graph in walk.graphs.items():
        _rewrite(walk, module, graph)
    for module in list(walk.names):
        if _is_our_block(module) or (module in walk.untraceable and _known_block_layout(module)):
            _convert_known_block(walk, module)
    fused = {name for name, _ in report.fused}
    reasons = {}
    for name, reason in report.left:
        reasons.setdefault(name, reason)
    report.left = []
    for name, m in model.named_modules():
        if type(m) in EAGER_BATCHNORMS and name not in fused:
            report.left.append((name, reasons.get(name) or _unreached_reason(walk, name)))
    if sync_batchnorm:
        model = convert_sync_batchnorm(model, process_group)
    return _finish(model, report, verbose, return_report)


def _unreached_reason(walk, name):
    for module_name, error in walk.report.untraced:
        if module_name == "" or name.startswith(module_name + "."):
            return f"it is called by {module_name or 'the model'}, which torch.fx could not trace"
    return "no traced forward calls it"


# ---------------------------------------------------------------------------------------------
# Inference.


@torch.no_grad()
def _fold_into_conv(conv, bn):
    """W' = W * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps), in float64."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.weight is not None:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double() + bn.bias.double()
    bias = conv.bias.double() * scale if conv.bias is not None else 0.0
    per_out_channel = (-1,) + (1,) * (conv.weight.dim() - 1)
    conv.weight.copy_((conv.weight.double() * scale.reshape(per_out_channel)).to(conv.weight.dtype))
    new_bias = (bias + shift).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def _folded_replacement(bn):
    if isinstance(bn, _BatchNormAddReLU):
        return AddReLU()
    if isinstance(bn, _BatchNormReLU):
        return nn.ReLU()
    return nn.Identity()


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
    if type(norm) in EAGER_BATCHNORMS or isinstance(norm, _FUSED_NORMS):
        return target, source
    return None


def _fold_target(walk, module, target, source):
    """The convolution the norm `target`, fed by `source`, folds into; None if it cannot."""
    bn = module.get_submodule(target)
    if bn.running_mean is None or bn.running_var is None:  # normalizes with batch statistics
        return None
    if not (isinstance(source, torch.fx.Node) and source.op == "call_module"):
        return None
    conv = module.get_submodule(source.target)
    if type(conv) not in _CONVS or conv.out_channels != bn.num_features:
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
    unless inplace=True. Refuses a model with any module in training mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"fused_resnet.optimize_for_inference: expected an nn.Module, got {type(model).__name__}"
        )
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            "fused_resnet.optimize_for_inference: the model must be in eval mode (call "
            f"model.eval() first); {len(training)} module(s) are in training mode, e.g. "
            f"{training[0]!r}"
        )
    model = model if inplace else copy.deepcopy(model)
    fold_report = ConversionReport()
    walk = _Walk(model, fold_report, trace_our_blocks=True)
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
            _fold_into_conv(module.get_submodule(conv_target), bn)
            parent, _, attr = bn_target.rpartition(".")
            setattr(module.get_submodule(parent), attr, _folded_replacement(bn))
            fold_report.folded.append(
                (walk.qualified(module, bn_target), walk.qualified(module, conv_target))
            )
    model, report = convert(model, inplace=True, return_report=True)
    report.folded = fold_report.folded
    return _finish(model, report, verbose, return_report)
