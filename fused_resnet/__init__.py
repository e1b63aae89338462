"""fused_resnet: fused BatchNorm + ReLU and BatchNorm + residual add + ReLU for PyTorch.

    import fused_resnet
    bn = fused_resnet.nn.BatchNormAddReLU2d(64)   # drop-in for nn.BatchNorm2d(64) + add + ReLU
    y = bn(x, identity)

The kernels live in the C++ extension fused_resnet._C (CPU, and CUDA when built with it) and in
fused_resnet.triton (CUDA; CPU tensors through the Triton interpreter). Without the extension the
package still imports, warns once, and runs on the eager "reference" backend (or Triton on CUDA).
"""

import importlib
import importlib.machinery
import warnings

import torch  # noqa: F401  (loads libtorch before the extension)

_REBUILD = (
    "rebuild it against this torch: `pip install --no-build-isolation -e .` in the source tree "
    "(or `pip wheel --no-build-isolation .` for a wheel)"
)


def _built_against():
    """The torch version this Python's fused_resnet._C was built against (fused_resnet/_build_info.py,
    written by setup.py), or None when unknown."""
    try:
        from ._build_info import BUILDS
    except ImportError:
        return None
    return BUILDS.get(importlib.machinery.EXTENSION_SUFFIXES[0], {}).get("torch")


_BUILT_AGAINST = _built_against()
_MISMATCH = (
    f"fused_resnet._C was built against torch {_BUILT_AGAINST}, but torch {torch.__version__} is running"
    if _BUILT_AGAINST is not None and _BUILT_AGAINST != torch.__version__
    else None
)

try:
    importlib.import_module(f"{__name__}._C")  # registers torch.ops.fused_resnet.*
    EXTENSION_ERROR = None
    if _MISMATCH is not None:  # it loaded, but another libtorch's ABI may not match it
        warnings.warn(f"{_MISMATCH}; {_REBUILD}.", RuntimeWarning, stacklevel=2)
except ImportError as error:  # pure-Python install, a build that failed, or another torch
    EXTENSION_ERROR = ImportError(f"{_MISMATCH} ({error})") if _MISMATCH is not None else error
    warnings.warn(
        f"fused_resnet: the C++ extension is not available ({EXTENSION_ERROR}); running on the eager "
        f"reference backend. To build it, {_REBUILD}.",
        RuntimeWarning,
        stacklevel=2,
    )

from . import functional, models, nn, ops
from .backend import available_backends, get_backend, set_backend, use_backend
from .convert import ConversionReport, convert, optimize_for_inference, unfuse

from .backends import register_all as _register_backends  # noqa: E402

_register_backends()  # reference, cpu and cuda (the extension's), triton: fused_resnet/backends

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
