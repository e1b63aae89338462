"""Rewrite existing models to use the fused modules: `convert`, and its inverse `unfuse`.

convert(model) finds, in every module's forward (rewrite/patterns.py has the full list of forms,
rewrite/activations.py the activations: ReLU, ReLU6, LeakyReLU, SiLU, Hardswish, GELU):
    y = act(bn(x))              ->  y = BatchNormAct*d(x, act=...)      (bn's only use is the act)
    y = act(bn(x) + r)          ->  y = BatchNormAddAct*d(x, r, act=...) (bn on either side)
    y = bn(x) + r               ->  y = BatchNormAddAct*d(x, r, act="identity")
(BatchNormReLU*d / BatchNormAddReLU*d for the ReLU), with nn.Identity placeholders (and inactive
stochastic depth) anywhere in between, and a BatchNorm that is the last layer of a container
(`conv2 = nn.Sequential(conv, bn)`, nested to any depth) whose caller applies the activation or
the add: the container's graph is spliced into the caller's (rewrite/inline.py). When both
operands of the add are BatchNorm outputs, the left one (the main branch, as torchvision and timm
write `out += shortcut`) takes the add. timm's BatchNormAct2d counts as a BatchNorm when it applies
no activation, and becomes a BatchNormReLU2d or BatchNormAct2d by itself when it applies one that
fuses. Frozen BatchNorms (torchvision's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d) fuse the
same way into FrozenBatchNormReLU / FrozenBatchNormAddReLU / FrozenBatchNormAct /
FrozenBatchNormAddAct (rewrite/norms.py).

The BatchNorm object itself becomes the fused module (only its class changes), so its qualified
name, parameters, buffers, settings, mode, device and dtype stay and state dicts load strictly in
both directions. A module whose forward changes keeps its class and gets, through a subclass made
for it, the forward torch.fx generates from the rewritten graph (rewrite/graphs.py); a GraphModule
gets the rewritten graph. Modules that torch.fx cannot trace do not stop the others, and the known
residual blocks (this package's, torchvision's BasicBlock/Bottleneck) convert from their known
dataflow. Every BatchNorm left is listed in the report with the reason: "cannot fuse: ..." when
the computation has no fused form, "not supported: ..." when convert does not take it.

What the rewrite never does: fuse a BatchNorm whose output has another use, that is shared or called
twice, that has hooks, or whose add writes into the residual in place (`r.add_(bn(x))` modifies r).
torch.fx records `a += b` as `a = a + b`, and the trace reads from the bytecode which one the forward
wrote (rewrite/operators.py): a module whose forward writes `a op= b` on a tensor that is an input,
an attribute, or used again afterwards (or an operator whose form cannot be read) is left as it is,
because regenerating its code would drop an in-place update another reader sees. `x = x + f(x)`
(torchvision's RegNet) converts.

convert(..., inplace=True) is all or nothing: if it fails, the model is as it was. unfuse(model)
turns everything convert did back into the plain modules and forwards, with the same keys.
"""

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
import torch.fx
from torch import nn

from ..contract import DEFAULT_ACT, DEFAULT_NEGATIVE_SLOPE
from ..nn.batchnorm import EAGER_BATCHNORMS, AddReLU, _BatchNormAddAct, _BatchNormAct
from ..nn.blocks import BasicBlock, Bottleneck
from ..nn.frozen import FrozenBatchNorm, FrozenBatchNormAddReLU
from ..nn.syncbn import convert_sync_batchnorm
from ..nn.tracing import record_function_call
from ..reference import activation
from .rewrite import norms, patterns
from .rewrite.activations import Activation
from .rewrite.graphs import (
    NotRewritable,
    has_forward,
    install_forward,
    install_graph,
    is_rewritten,
    module_graph,
)
from .rewrite.inline import splice, splice_blocker
from .rewrite.norms import APPLIES_ACT, PLAIN, fuse_norm
from .rewrite.operators import SYMBOLS, in_place_on_shared, shared_operand
from .rewrite.patterns import REACHES_OUTPUT, cannot, unsupported
from .rewrite.undo import all_or_nothing

_module_graph = module_graph  # the names tests replace
_fuse = fuse_norm  # makes a BatchNorm or a frozen BatchNorm its fused twin (rewrite/norms.py)
FUSED_NORMS = (_BatchNormAct, _BatchNormAddAct)
RELU = Activation("relu")


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


def _bn_add_act(bn, input, residual, bn_on_left):
    """act(bn(input) + residual) in one kernel when the residual has the BatchNorm output's
    shape, dtype and device; otherwise (a broadcast or promoting add) exactly as the original."""
    traced = record_function_call(_bn_add_act, bn, input, residual, bn_on_left)
    if traced is not None:  # torch.fx traces the converted model
        return traced
    if (
        isinstance(residual, torch.Tensor)
        and residual.shape == input.shape
        and residual.dtype == input.dtype
        and residual.device == input.device
    ):
        return bn(input, residual)
    if isinstance(bn, AddReLU):  # optimize_for_inference folded the normalization away
        out = input
    elif isinstance(bn, FrozenBatchNormAddReLU):  # nn.freeze_batchnorm replaced it
        out = FrozenBatchNorm.forward(bn, input)
    else:
        eager_class = next(c for c in type(bn).__mro__ if c in EAGER_BATCHNORMS)
        out = eager_class.forward(bn, input)
    # AddReLU applies the ReLU and has no attributes; the other modules name their activation
    act, negative_slope = getattr(bn, "act", DEFAULT_ACT), getattr(bn, "negative_slope", DEFAULT_NEGATIVE_SLOPE)
    return activation(out + residual if bn_on_left else residual + out, act, negative_slope)


def _in_place_blocker(graph, module_name):
    """Why the forward of `module_name`, whose graph is `graph`, cannot be regenerated (it updates
    in place a tensor another reader sees, or may), or None."""
    found = in_place_on_shared(graph)
    if found is None:
        return None
    node, in_place = found
    where = f"the forward of {module_name or 'the model'}"
    symbol = SYMBOLS[node.target]
    if in_place:
        return (
            f"{where} writes `{symbol}=` into {shared_operand(node)}, an update in place that the "
            "forward torch.fx regenerates would not make"
        )
    return (
        f"{where} applies {node.target.__name__} to a tensor read elsewhere ({shared_operand(node)}) "
        f"where no `{symbol}` or `{symbol}=` operator tells the form, and torch.fx cannot tell "
        "`a += b` from `a = a + b`"
    )


# ---------------------------------------------------------------------------------------------
# The model walk shared by convert and optimize_for_inference.


@dataclass
class _Tail:
    """A module whose forward returns a BatchNorm's output, unfused: its caller may fuse it."""

    node: torch.fx.Node  # in the module's graph: the BatchNorm call, or a container's call
    name: str  # the BatchNorm's qualified name
    placeholders: list  # nn.Identity calls between it and the output


class _Walk:
    """The modules of a model, their graphs, and who calls which module.

    live_only=True (optimize_for_inference, on the model convert rewrote) keeps the graphs of
    the modules a forward may still call (_live): a container convert spliced into its caller's
    graph is called by no one, and its own graph, still naming its children, would count their
    calls twice."""

    def __init__(self, model, trace_our_blocks, live_only=False):
        self.model = model
        self.untraced = []  # (name, why)
        self.names = {m: n for n, m in model.named_modules()}
        self.owners = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.graphs = {}  # module -> graph, innermost modules first
        self.calls = Counter()  # id(submodule) -> nodes that call or fetch it, over all graphs
        self.reasons = {}  # BatchNorm -> why it is not fused (the outermost analysis's)
        self.tails = {}  # module -> _Tail
        self.fused = []  # (name, fused class)
        for name, module in sorted(model.named_modules(), key=lambda item: -_depth(item[0])):
            if norms.is_norm(module) or not has_forward(module):
                continue
            if _is_our_block(module) and not trace_our_blocks:
                continue
            if not any(norms.is_norm(m) for m in module.modules()):
                continue
            try:
                self.graphs[module] = _module_graph(module)
            except NotRewritable as why:
                self.untraced.append((name, str(why)))
        self.untraced.reverse()  # outermost first
        if live_only:
            live = self._live()
            self.graphs = {m: g for m, g in self.graphs.items() if m in live}
        for module, graph in self.graphs.items():
            for node in graph.nodes:
                target = _called(module, node)
                if target is not None:
                    self.calls[id(target)] += 1

    def _live(self):
        """The modules a forward may call: the model; a module that a live module's graph calls;
        a module under a live module that has no graph (torch.fx could not trace it, or it holds
        no BatchNorm, or it is a ModuleList), which may call anything; a shared module."""
        callers = {}  # id(module) -> the modules whose graph calls it: its ancestors
        for module, graph in self.graphs.items():
            for node in graph.nodes:
                target = _called(module, node)
                if target is not None:
                    callers.setdefault(id(target), []).append(module)
        modules = dict(self.model.named_modules())
        live = set()
        for name, module in modules.items():  # parents before children
            parent = modules[name.rpartition(".")[0]] if name else None
            if (
                parent is None
                or self.owners[id(module)] > 1
                or (parent in live and parent not in self.graphs)
                or any(caller in live for caller in callers.get(id(module), ()))
            ):
                live.add(module)
        return live

    def qualified(self, module, target):
        prefix = self.names[module]
        return f"{prefix}.{target}" if prefix else target

    def why_not_alone(self, module, what="it"):
        """Why `module` cannot change kind without others noticing, or None."""
        if self.owners[id(module)] > 1:
            return unsupported(f"{what} is shared (registered under several names)")
        if self.calls[id(module)] > 1:
            return unsupported(f"{what} is called more than once")
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
            return unsupported(f"{what} has hooks, which would see the fused computation")
        return None


def _depth(name):
    """How deep in the model a qualified name lies: 0 for the model itself."""
    return name.count(".") + 1 if name else 0


def _resolve(module, target):
    try:
        return module.get_submodule(target)
    except AttributeError:
        return None


def _called(module, node):
    """The submodule that `node`, of `module`'s graph, calls or fetches; None for other nodes."""
    if node.op in ("call_module", "get_attr"):
        target = _resolve(module, node.target)
        if isinstance(target, nn.Module):
            return target
    return None


# ---------------------------------------------------------------------------------------------
# Rewriting one module's graph.


def _site(walk, module, node):
    """(BatchNorm name, None) or (name, reason) when `node` calls a plain BatchNorm or a module
    whose forward ends in one; None for any other node."""
    if node.op != "call_module":
        return None
    target = module.get_submodule(node.target)
    if norms.norm_kind(target) == PLAIN:
        if len(node.args) != 1 or node.kwargs:
            return walk.qualified(module, node.target), unsupported("it is called with more than one argument")
        return walk.qualified(module, node.target), walk.why_not_alone(target)
    tail = walk.tails.get(target)
    if tail is None:
        return None
    where = f"it is the last layer of {walk.names[target]}"
    blocker = walk.why_not_alone(target, what=f"{where}, which")
    if blocker is None:
        blocker = splice_blocker(node, walk.graphs[target])
        blocker = blocker and unsupported(f"{where}, which {blocker}")
    if blocker is None:
        in_place = _in_place_blocker(walk.graphs[target], walk.names[target])
        blocker = in_place and unsupported(f"{where}, to be spliced into its caller, and {in_place}")
    return tail.name, blocker


def _rewrite(walk, module, graph):
    """Fuse what `module`'s graph allows and install the regenerated forward."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    found, refused = [], []
    for node in list(graph.nodes):
        site = _site(walk, module, node)
        if site is None:
            continue
        name, reason = site
        result = reason or patterns.find_fusion(module, node, order, walk.names[module])
        if result == REACHES_OUTPUT:
            walk.tails[module] = _Tail(node, name, patterns.follow(node, module)[1])
            walk.reasons[name] = _output_reason(walk, module)
        elif isinstance(result, str):
            walk.reasons[name] = result
            refused.append((name, node))
        else:
            result.name = name
            result.container = norms.norm_kind(module.get_submodule(node.target)) != PLAIN
            found.append(result)
    if not found:
        return
    blocker = _in_place_blocker(graph, walk.names[module])
    if blocker is not None:
        for fusion in found:
            walk.reasons[fusion.name] = unsupported(blocker)
        return
    found = _one_per_add(walk, module, found, refused)
    for fusion in found:
        _apply(walk, module, graph, fusion)
    graph.lint()
    install_graph(module, graph)


def _output_reason(walk, module):
    if module is walk.model:
        return cannot("its output is the model's output")
    return unsupported(f"it is the last layer of {walk.names[module]}, whose caller torch.fx could not trace")


def _one_per_add(walk, module, found, refused):
    """When both operands of an add are BatchNorm outputs, the left one takes the add. A BatchNorm
    refused for another reason (`proj(x) + f(x)`: its input is read again before the add) whose
    add the other operand takes is listed for that, the reason that holds in any case."""
    by_add = {}
    for fusion in found:
        if fusion.add is not None:
            by_add.setdefault(fusion.add, []).append(fusion)
    kept = []
    for fusion in found:
        rivals = by_add.get(fusion.add, [fusion]) if fusion.add is not None else [fusion]
        winner = next((f for f in rivals if f.bn_on_left), rivals[0])
        if fusion is winner:
            kept.append(fusion)
        else:
            walk.reasons[fusion.name] = _other_operand_takes_it(winner)
    for name, node in refused:
        users = patterns.follow(node, module)[2]
        if len(users) == 1 and users[0] in by_add:
            walk.reasons[name] = _other_operand_takes_it(next(f for f in kept if f.add is users[0]))
    return kept


def _other_operand_takes_it(winner):
    return cannot(f"the other operand of its add, {winner.name}, takes the add (one BatchNorm per add)")


def _apply(walk, module, graph, fusion):
    node, placeholders = fusion.node, list(fusion.placeholders)
    while fusion.container:  # splice the container's graph in, down to the BatchNorm call
        container = module.get_submodule(node.target)
        tail = walk.tails[container]
        copies = splice(graph, node, walk.graphs[container], node.target)
        node = copies[tail.node]
        placeholders = [copies[p] for p in tail.placeholders] + placeholders
        fusion.container = norms.norm_kind(module.get_submodule(node.target)) != PLAIN
    bn = module.get_submodule(node.target)
    for value in [node] + placeholders:  # shape reads: the BatchNorm's input has the same
        for reader in [u for u in value.users if patterns.reads_metadata(u)]:
            reader.replace_input_with(value, node.args[0])
    if fusion.add is None:
        fusion.act_node.replace_all_uses_with(node)
        dead = [fusion.act_node] + placeholders[::-1]
    else:
        # Read the residual now: an earlier fusion may have replaced the node it was.
        left, right, _ = patterns.add_operands(fusion.add)
        residual = right if fusion.bn_on_left else left
        with graph.inserting_before(fusion.add):
            bn_attr = graph.get_attr(node.target)
            fused = graph.call_function(_bn_add_act, (bn_attr, node.args[0], residual, fusion.bn_on_left))
        # The activation's output, or with none (identity) the sum itself, is the fused output.
        last = fusion.act_node or fusion.add
        last.replace_all_uses_with(fused)
        dead = [*([fusion.act_node] if fusion.act_node else []), *fusion.sum_placeholders[::-1], fusion.add]
        dead += [*placeholders[::-1], node]
    for value in dead:
        graph.erase_node(value)
    _fuse(bn, fusion.add is not None, fusion.activation)
    walk.fused.append((fusion.name, type(bn).__name__))


# ---------------------------------------------------------------------------------------------
# Blocks whose dataflow is known without tracing.


def _is_our_block(module):
    """This package's blocks: their forward adapts to fused norms by itself (norm_relu, ...)."""
    return (
        type(module).forward in (BasicBlock.forward, Bottleneck.forward)
        and "forward" not in module.__dict__
        and not is_rewritten(module)
    )


_TORCHVISION_BLOCKS = {"BasicBlock.forward": "bn2", "Bottleneck.forward": "bn3"}


def _known_block_layout(module):
    """[(norm attribute, takes the residual)] for the blocks whose dataflow is known: this
    package's, and torchvision's BasicBlock/Bottleneck (recognized by their own, unmodified
    forward and their attributes)."""
    forward = type(module).forward
    if _is_our_block(module):
        last = "bn3" if isinstance(module, Bottleneck) else "bn2"
    elif getattr(forward, "__module__", "") == "torchvision.models.resnet" and not is_rewritten(module):
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
    for attr, with_residual in layout:
        bn = getattr(module, attr)
        name = walk.qualified(module, attr)
        if norms.norm_kind(bn) != PLAIN:
            continue
        reason = walk.why_not_alone(bn)
        if reason:
            walk.reasons[name] = reason
            continue
        _fuse(bn, with_residual, RELU)
        walk.fused.append((name, type(bn).__name__))
    if not _is_our_block(module):  # torchvision's: run our forward, which has its dataflow
        function = Bottleneck.forward if layout[-1][0] == "bn3" else BasicBlock.forward
        install_forward(module, function, None)


# ---------------------------------------------------------------------------------------------
# convert and unfuse.


def _check_sync(sync_batchnorm, process_group):
    if process_group is not None and not sync_batchnorm:
        raise ValueError("fused_resnet.convert: process_group is only used with sync_batchnorm=True")


def _check_module(caller, model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"fused_resnet.{caller}: expected an nn.Module, got {type(model).__name__}")


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
    """Replace BatchNorm + activation, BatchNorm + add + activation and BatchNorm + add in
    `model` by the fused modules.

    Returns the converted model (a deep copy unless inplace=True), or (model, ConversionReport)
    with return_report=True; verbose=True prints the report. The result computes what `model`
    computes and has the same state_dict keys. With inplace=True a failure leaves `model` as it
    was. A torch.fx GraphModule is converted in its own graph.

    sync_batchnorm=True then makes every BatchNorm synchronized over `process_group` (default:
    the whole world) with fused_resnet.nn.convert_sync_batchnorm: the fused modules become
    SyncBatchNormReLU / SyncBatchNormAddReLU / SyncBatchNormAct / SyncBatchNormAddAct, the
    BatchNorms left unfused nn.SyncBatchNorm.
    """
    _check_sync(sync_batchnorm, process_group)
    _check_module("convert", model)
    model = model if inplace else copy.deepcopy(model)
    with all_or_nothing(model):
        walk = _Walk(model, trace_our_blocks=False)
        for module, graph in walk.graphs.items():
            _rewrite(walk, module, graph)
        untraceable = {m for m in walk.names if walk.names[m] in dict(walk.untraced)}
        for module in list(walk.names):
            if _is_our_block(module) or (module in untraceable and _known_block_layout(module)):
                _convert_known_block(walk, module)
        for name, module in model.named_modules():
            if norms.norm_kind(module) == APPLIES_ACT:
                # it applies its activation itself: only hooks that see its input or gradients notice
                if module._forward_pre_hooks or module._backward_hooks:
                    walk.reasons[name] = unsupported("it has pre-forward or backward hooks")
                else:
                    _fuse(module, False, norms.own_activation(module))
                    walk.fused.append((name, type(module).__name__))
        report = _report(walk)
        if sync_batchnorm:
            model = convert_sync_batchnorm(model, process_group)
    return _finish(model, report, verbose, return_report)


def _report(walk):
    report = ConversionReport(untraced=list(walk.untraced))
    fused = dict(walk.fused)
    for name, module in walk.model.named_modules():
        if name in fused:
            report.fused.append((name, fused[name]))
        elif norms.is_norm(module) and not norms.is_fused(module):
            kind = norms.norm_kind(module)
            reason = walk.reasons.get(name) or (kind if kind not in (PLAIN, None) else None)
            report.left.append((name, reason or _unreached_reason(walk, name)))
    return report


def _unreached_reason(walk, name):
    for module_name, _ in walk.untraced:
        if module_name == "" or name.startswith(module_name + "."):
            return unsupported(f"it is called by {module_name or 'the model'}, which torch.fx could not trace")
    return unsupported("no traced forward calls it")
