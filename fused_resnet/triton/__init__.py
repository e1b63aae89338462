"""The "triton" backend: Triton kernels (kernels.py) and their launchers (launchers.py), registered
as the ops fused_resnet_triton::* with the shared fake impls and autograd of fused_resnet.ops.

It runs CUDA tensors. With TRITON_INTERPRET=1 in the environment before triton is imported, the
Triton interpreter runs the same kernels on CPU tensors (slowly, numpy underneath): that is how
the test suite covers this backend on a machine without a GPU. "auto" never picks it for CPU
tensors.

triton is imported only here, when the backend registers; if it is missing or fails to import,
the package still imports and the backend is marked unavailable with the reason.
"""

import os

import torch

from .. import backend as _backend


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET asks for the Triton interpreter (the values triton accepts)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _device_types():
    device_types = []
    if torch.version.cuda is not None or torch.version.hip is not None:
        device_types.append("cuda")
    if interpreter_enabled():
        device_types.append("cpu")
    return tuple(device_types)


def register_backend() -> None:
    device_types = _device_types()
    if not device_types:
        _backend.mark_unavailable(
            "triton",
            "this PyTorch build has no CUDA; set TRITON_INTERPRET=1 before importing fused_resnet to "
            "run the Triton kernels on CPU tensors through the Triton interpreter (slow, for testing)",
        )
        return
    try:
        from . import launchers
    except ImportError as error:
        _backend.mark_unavailable("triton", f"triton is not installed or failed to import ({error})")
        return
    except Exception as error:  # an incompatible triton can fail in many ways at import
        _backend.mark_unavailable("triton", f"the Triton kernels failed to load ({type(error).__name__}: {error})")
        return

    from .. import ops

    op_set = launchers.op_set(device_types)
    ops.register_op_set(op_set, relu_mask_bytes=ops.no_relu_mask_bytes)
    ops.register_bn_act_autograd(launchers.library, op_set.bn_act, op_set.bn_act_bwd)
    _backend.register(
        _backend.Backend(
            name="triton", device_types=device_types, ops=op_set, relu_mask_bytes=ops.no_relu_mask_bytes
        )
    )
