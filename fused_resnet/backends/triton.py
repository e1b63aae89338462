"""The "triton" backend: the Triton kernels of fused_resnet/triton, registered as the ops
fused_resnet_triton::* (launchers.py), with the shared fake impls and autograd of fused_resnet.ops.

It runs CUDA tensors. With TRITON_INTERPRET=1 in the environment before triton is imported, the
Triton interpreter runs the same kernels on CPU tensors (slowly, numpy underneath): that is how
the test suite covers this backend on a machine without a GPU. "auto" never picks it for CPU
tensors. triton is imported only here, when the backend loads; if it is missing or fails to
import, the package still imports and the backend is unavailable with the reason.
"""

import torch

from ..backend import Backend
from ..ops import no_act_mask_bytes, register_bn_act_autograd, register_op_set
from ..triton import interpreter_enabled


def _device_types():
    device_types = []
    if torch.version.cuda is not None or torch.version.hip is not None:
        device_types.append("cuda")
    if interpreter_enabled():
        device_types.append("cpu")
    return tuple(device_types)


def load():
    device_types = _device_types()
    if not device_types:
        return {
            "triton": "this PyTorch build has no CUDA; set TRITON_INTERPRET=1 before importing fused_resnet "
            "to run the Triton kernels on CPU tensors through the Triton interpreter (slow, for testing)"
        }
    try:
        from ..triton import launchers
    except ImportError as error:
        return {"triton": f"triton is not installed or failed to import ({error})"}
    except Exception as error:  # an incompatible triton can fail in many ways at import
        return {"triton": f"the Triton kernels failed to load ({type(error).__name__}: {error})"}
    op_set = launchers.op_set(device_types)
    register_op_set(op_set, act_mask_bytes=no_act_mask_bytes)
    register_bn_act_autograd(launchers.library, op_set.bn_act, op_set.bn_act_bwd)
    return {"triton": Backend("triton", device_types, op_set, no_act_mask_bytes)}
