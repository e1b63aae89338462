"""The machinery behind fused_resnet.convert, optimize_for_inference and unfuse.

    graphs.py       trace one module's forward with torch.fx; install a regenerated forward
    operators.py    how the forward wrote each binary operator, `a + b` or `a += b` (its bytecode)
    norms.py        which modules are BatchNorms (trainable, frozen, timm's) and the class change
                    that fuses one
    activations.py  the activations that fuse (ReLU, ReLU6, LeakyReLU, SiLU, Hardswish, GELU), as
                    modules, functions and methods, and why the others do not
    patterns.py     what a BatchNorm's output reaches in a graph: an activation, an add (and an
                    activation, or none), or why neither
    inline.py       splice a container's graph into its caller's (a BatchNorm last in a Sequential)
    undo.py         all or nothing: a failed conversion restores the model it changed
"""
