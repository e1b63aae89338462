"""How each binary operator of a traced forward was written: `a + b` or `a += b`.

torch.fx records both as operator.add (its Proxy has no __iadd__, so Python falls back to
__add__) and regenerates `a + b`. That is exact unless `a` is a tensor someone else reads (an
input, an attribute, a value used again later): written `a += b`, the forward updated it in place,
and the regenerated one would not. The source tells the two apart, and so does the bytecode.

The form is read off the bytecode while the trace runs (`mark_form`, called by the tracer as a
Proxy's operator method records the node): the frame that applied the operator is suspended at
the instruction that did it, BINARY_OP with its in-place argument (`+=`, `-=`, ...) or its plain
one (`+`); before Python 3.11, INPLACE_ADD or BINARY_ADD. Bytecode rather than the AST (through
inspect.getsource): it needs no source file (a class defined by exec or in a notebook cell whose
source is gone, an install of .pyc files only), it follows the helper functions the trace goes
through, and it names the instruction of each node where one line may hold several operators.

When no instruction tells (the operator was called as a function, `operator.add(a, b)` or
`operator.iadd(a, b)`; or from C code, `sum(values)`) the node's form is unknown, and convert
treats it as possibly in place. A torch.fx GraphModule's graph, and a graph convert already
installed as a forward, are the code that runs: torch.fx generates `a + b` from their
operator.add nodes, so `mark_written_plain` marks them all plain.

Why not regenerate `a += b` (torch.fx prints operator.iadd nodes so): for a tensor it updates the
same object, but for a Python number (a size read from a traced shape) it rebinds the variable
that names the node, and the node's later readers would see the new value.
"""

import dis
import functools
import operator
import os

import torch.fx

# The operators Python applies in place when written augmented (`a op= b`), with their symbols.
SYMBOLS = {
    operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
    operator.floordiv: "//", operator.mod: "%", operator.pow: "**", operator.matmul: "@",
    operator.and_: "&", operator.or_: "|", operator.xor: "^", operator.lshift: "<<",
    operator.rshift: ">>",
}  # fmt: skip

IN_PLACE = "fused_resnet_in_place"  # node.meta: True for `a op= b`, False for `a op b`; absent: unknown

_FX_DIR = os.path.dirname(torch.fx.__file__) + os.sep


@functools.lru_cache(maxsize=512)
def _instructions(code):
    return {instruction.offset: instruction for instruction in dis.get_instructions(code)}


def _written_in_place(frame):
    """True when the first frame outside torch.fx, from `frame` outwards, is applying an
    augmented operator, False for a plain one, None when its instruction is no operator."""
    while frame is not None and frame.f_code.co_filename.startswith(_FX_DIR):
        frame = frame.f_back
    if frame is None:
        return None
    instruction = _instructions(frame.f_code).get(frame.f_lasti)
    if instruction is None:
        return None
    if instruction.opname == "BINARY_OP":  # Python 3.11+: the argument says `+` or `+=`
        return instruction.argrepr.endswith("=")
    if instruction.opname.startswith("INPLACE_"):  # Python 3.10 and before
        return True
    if instruction.opname.startswith("BINARY_"):
        return False
    return None


def mark_form(node, frame):
    """Record on `node`, a binary operator node the trace just made from the operator method
    running in `frame`, how the forward wrote it."""
    if node.op == "call_function" and node.target in SYMBOLS:
        in_place = _written_in_place(frame)
        if in_place is not None:
            node.meta[IN_PLACE] = in_place


def mark_written_plain(graph):
    """Mark every binary operator node of `graph`, the code that runs, as written `a op b`."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target in SYMBOLS:
            node.meta[IN_PLACE] = False
    return graph


def in_place_on_shared(graph):
    """(node, in_place) for the first node `a op b` whose `a` another reader sees (an input, an
    attribute, a value used after it) and that was written `a op= b` (in_place True) or may have
    been (None: its form is unknown); None when regenerating the graph keeps every update."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in SYMBOLS:
            continue
        in_place = node.meta.get(IN_PLACE)
        left = node.args[0]
        if in_place is False or not isinstance(left, torch.fx.Node):
            continue
        if left.op in ("placeholder", "get_attr") or any(order[u] > order[node] for u in left.users):
            return node, in_place
    return None


def shared_operand(node):
    """The left operand of the node `in_place_on_shared` found, in words."""
    left = node.args[0]
    if left.op == "placeholder":
        return f"the input {left.target}"
    if left.op == "get_attr":
        return f"the attribute {left.target}"
    return f"{left.name}, which is read again after it"
