"""The machinery behind fused_resnet.convert, optimize_for_inference and unfuse.

    graphs.py     trace one module's forward with torch.fx; install a regenerated forward
    patterns.py   what a BatchNorm's output reaches in a graph: ReLU, add + ReLU, or why not
    inline.py     splice a container's graph into its caller's (a BatchNorm last in a Sequential)
    undo.py       all or nothing: a failed conversion restores the model it changed
"""
