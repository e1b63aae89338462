"""Rewriting models people already have: `convert` (fuse.py) fuses their BatchNorms, trainable
and frozen, with the activation, the add + activation, or the add that follows;
`optimize_for_inference` (inference.py) fuses, then folds eval-mode BatchNorms into the preceding
convolution; `unfuse` (unfuse.py) gives the plain model back. rewrite/ holds the machinery they
share: tracing one module and installing its forward (graphs.py), how each operator was written
(operators.py), which modules are BatchNorms and fusing one (norms.py), which activations fuse
(activations.py), the patterns (patterns.py), splicing a container's graph into its caller's
(inline.py), all or nothing (undo.py).
"""

from .fuse import ConversionReport, convert
from .inference import optimize_for_inference
from .unfuse import unfuse

__all__ = ["ConversionReport", "convert", "optimize_for_inference", "unfuse"]
