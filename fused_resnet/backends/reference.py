"""The "reference" backend: the eager composition of fused_resnet/reference.py, on every device.
It is the fallback when no compiled backend runs a device, and the tests' oracle."""

from .. import reference as _reference
from ..backend import Backend
from ..ops import no_act_mask_bytes


def load():
    return {
        "reference": Backend(
            name="reference", device_types=("cpu", "cuda"), ops=_reference.OPS, act_mask_bytes=no_act_mask_bytes
        )
    }
