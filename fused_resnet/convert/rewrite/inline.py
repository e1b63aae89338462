"""Splice a submodule's graph into its caller's graph, in place of the call.

torchvision's video ResNets end a branch with `conv2 = nn.Sequential(conv, BatchNorm3d)` and add
the shortcut and apply the ReLU in the block's forward: the BatchNorm and its add + ReLU live in
two graphs. Splicing the Sequential's graph into the block's puts them in one, where the fusion
is found as anywhere else; the block's regenerated forward then calls conv2's children itself.
"""

import torch.fx


def splice_blocker(call, graph):
    """Why the call_module node `call` cannot be replaced by `graph` (\"is called with ...\"), or None."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if call.kwargs or len(call.args) != len(placeholders):
        return "is called with other arguments than its forward's positional ones"
    if any(str(p.target).startswith("*") for p in placeholders):
        return "takes *args"
    return None


def splice(graph, call, sub_graph, prefix):
    """Replace the node `call` of `graph` by a copy of `sub_graph` (the graph of the submodule at
    `prefix`), its placeholders bound to the call's arguments and its submodule and attribute
    targets prefixed. Returns {sub_graph node: its copy}."""
    copies = {}
    placeholders = [n for n in sub_graph.nodes if n.op == "placeholder"]
    copies.update(zip(placeholders, call.args))
    result = None
    with graph.inserting_before(call):
        for node in sub_graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                result = torch.fx.map_arg(node.args[0], copies.__getitem__)
                continue
            copied = graph.node_copy(node, copies.__getitem__)
            if node.op in ("call_module", "get_attr"):
                copied.target = f"{prefix}.{node.target}"
            copies[node] = copied
    call.replace_all_uses_with(result)
    graph.erase_node(call)
    return copies
