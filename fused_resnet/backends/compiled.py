"""The "cpu" and "cuda" backends: the C++ ops torch.ops.fused_resnet.* of the extension
fused_resnet._C (csrc/), one op set with a kernel per device (the CUDA ones when the extension was
built with them). bn_act's autograd is in C++ (csrc/common/bn_act_autograd.cpp); the fake impls
and the functional ops' autograd come from fused_resnet.ops.register_op_set."""

import torch

from .. import contract
from ..backend import Backend
from ..ops import cpu_act_mask_bytes, register_op_set


def load():
    import fused_resnet

    if fused_resnet.EXTENSION_ERROR is not None:
        reason = f"the C++ extension fused_resnet._C failed to load ({fused_resnet.EXTENSION_ERROR})"
        return {"cpu": reason, "cuda": reason}
    ops = contract.op_set_of(torch.ops.fused_resnet)
    register_op_set(ops, act_mask_bytes=cpu_act_mask_bytes)
    loaded = {}
    for device_type in ("cpu", "cuda"):
        if torch._C._dispatch_has_kernel_for_dispatch_key(ops.bn_act.name(), device_type.upper()):
            # act_mask_bytes: 0 for every CUDA input
            loaded[device_type] = Backend(device_type, (device_type,), ops, cpu_act_mask_bytes)
        else:
            loaded[device_type] = "the C++ extension was built without CUDA kernels"
    return loaded
