"""fused_resnet: fused BatchNorm + ReLU and BatchNorm + residual add + ReLU for PyTorch.

    import fused_resnet
    bn = fused_resnet.nn.BatchNormAddReLU2d(64)   # drop-in for nn.BatchNorm2d(64) + add + ReLU
    y = bn(x, identity)

The kernels live in the C++ extension fused_resnet._C (CPU, and CUDA when built with it) and in
fused_resnet.triton (CUDA; CPU tensors through the Triton interpreter). Without the extension the
package still imports, warns once, and runs on the eager "reference" backend (or Triton on CUDA).
"""

import importlib
import warnings

import torch  # noqa: F401  (loads libtorch before the extension)

try:
    importlib.import_module(f"{__name__}._C")  # registers torch.ops.fused_resnet.*
    EXTENSION_ERROR = None
except ImportError as error:  # pure-Python install, or a build that failed
    EXTENSION_ERROR = error
    warnings.warn(
        f"fused_resnet: the C++ extension is not available ({error}); running on the eager "
        "reference backend. Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

from . import functional, models, nn, ops
from .backend import available_backends, get_backend, set_backend, use_backend
from .convert import ConversionReport, convert
from .inference import optimize_for_inference
from .unfuse import unfuse

ops._register_compiled_backends(EXTENSION_ERROR)

from .triton import register_backend as _register_triton_backend  # noqa: E402

_register_triton_backend()

__version__ = "0.1.0"

__all__ = [
    "functional",
    "models",
    "nn",
    "ops",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "convert",
    "optimize_for_inference",
    "unfuse",
    "ConversionReport",
]
