"""Rewriting models people already have: `convert` (fuse.py) fuses their BatchNorms, trainable
and frozen, with the ReLU or the add + ReLU that follows; `optimize_for_inference`
(inference.py) folds eval-mode BatchNorms into the preceding convolution and fuses what is left;
`unfuse` (unfuse.py) gives the plain model back. rewrite/ holds the machinery they share: tracing
one module and installing its forward (graphs.py), how each operator was written (operators.py),
which modules are BatchNorms and fusing one (norms.py), the patterns (patterns.py), splicing a
container's graph into its caller's (inline.py), all or nothing (undo.py).
"""

from .fuse import ConversionReport, convert
from .inference import optimize_for_inference
from .unfuse import unfuse

__all__ = ["ConversionReport", "convert", "optimize_for_inference", "unfuse"]
