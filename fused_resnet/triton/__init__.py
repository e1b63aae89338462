"""The Triton kernels of the "triton" backend (registered by fused_resnet/backends/triton.py):
kernels.py (the @triton.jit kernels), tiles.py (each launch's tile), partition.py (view, plan,
grids), launch.py (how a kernel is launched), launchers.py (the ops fused_resnet_triton::*).

triton itself is imported only when the backend loads (launchers.py and below); this module is
importable without it.
"""

import os


def interpreter_enabled() -> bool:
    """Whether TRITON_INTERPRET asks for the Triton interpreter (the values triton accepts)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")
