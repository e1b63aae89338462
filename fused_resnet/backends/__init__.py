"""The backends, each registered the same way: a module here whose `load()` returns, for each
backend name it provides, its `backend.Backend` or the reason it cannot run here.
`register_all()` (called once by fused_resnet/__init__.py) loads each module in the order below
and registers what it returns.

  reference   the eager composition (fused_resnet/reference.py): every device, always
  compiled    the C++ extension fused_resnet._C: "cpu", and "cuda" when built with CUDA kernels
  triton      the Triton kernels (fused_resnet/triton): CUDA tensors, and CPU tensors through the
              Triton interpreter (TRITON_INTERPRET=1)

docs/design.md ("Adding a backend") says how to add one.
"""

from .. import backend as _backend
from . import compiled, reference, triton

MODULES = (reference, compiled, triton)


def register_all() -> None:
    for module in MODULES:
        for name, loaded in module.load().items():
            if isinstance(loaded, _backend.Backend):
                _backend.register(loaded)
            else:
                _backend.mark_unavailable(name, loaded)
