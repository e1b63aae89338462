"""How the launchers start a Triton kernel: on the tensors' device, straight to the kernel or
through wrap_triton when a tracer watches, and counted when asked.

`Kernel` wraps one @triton.jit kernel once, at import; a launch is `kernel(grid, *args, **meta)`
with a fixed grid tuple and the tile's meta (tiles.py): no wrapper objects, grid closures or
autotuner state per launch.
  - Under a tracer (torch.compile or make_fx through a triton_op, where wrap_triton is enabled)
    the launch goes through wrap_triton, so the graph records the kernel. Otherwise (a triton_op's
    eager call, bn_act's device kernel) it calls the JIT function itself.
  - Under the Triton interpreter the kernel is an InterpretedFunction, launched directly and one
    at a time: the interpreter patches triton.language globally while it runs a grid, so two
    threads' launches must not overlap.
`device_guard(device)` makes a CUDA tensor's device current for the launches (Triton launches on
the current device and its current stream); a no-op when it already is.
`count_specializations()` records the JIT specialization key of every launch (what Triton
compiles a variant for), optionally without launching: the GPU run's compile count, here.
"""

import contextlib
import threading
from typing import Optional

import torch
from torch._library.triton import is_wrap_triton_enabled
from torch.library import wrap_triton

from . import interpreter_enabled, kernels

# Whether kernels.py's kernels run on the interpreter: @triton.jit decided it (TRITON_INTERPRET)
# when it decorated them, at import.
INTERPRETED = interpreter_enabled()
_INTERPRETER_LOCK = threading.Lock()


def device_guard(device: torch.device):
    """The context under which a launch runs on `device`: its CUDA device made current when it is
    not (nn.DataParallel replicas, tensors on cuda:1 with cuda:0 current), else nothing."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


class Kernel:
    """One Triton kernel as the launchers call it."""

    def __init__(self, fn):
        self.fn = fn
        function = fn.fn  # the Python function (JITFunction and InterpretedFunction both hold it)
        self.name = function.__name__
        self.arg_names = function.__code__.co_varnames[: function.__code__.co_argcount]
        self.unspecialized = frozenset(kernels._UNSPECIALIZED) & frozenset(self.arg_names)

    def __call__(self, grid, *args, **meta):
        if _counter is not None:
            _counter.record(self, args, meta)
            if not _counter.launch:
                return
        if INTERPRETED:
            with _INTERPRETER_LOCK:
                self.fn[grid](*args, **meta)
        elif is_wrap_triton_enabled():
            wrap_triton(self.fn)[grid](*args, **meta)
        else:
            self.fn.run(*args, grid=grid, warmup=False, **meta)


def _int_property(value: int, specialize: bool):
    kind = "i32" if -(2**31) <= value < 2**31 else "i64"
    if not specialize:
        return kind
    return (kind, "1" if value == 1 else "D" if value % 16 == 0 else "")


def specialization_key(kernel: Kernel, args, meta) -> tuple:
    """What Triton (3.x) compiles one variant of `kernel` for: the constexprs and launch options,
    each tensor's dtype and 16-byte alignment, each integer's type and, unless the kernel leaves
    it unspecialized, whether it is 1 or a multiple of 16; floats are float32."""
    signature = []
    for name, value in zip(kernel.arg_names, args):
        if isinstance(value, torch.Tensor):
            signature.append((value.dtype, value.data_ptr() % 16 == 0))
        elif isinstance(value, bool):
            signature.append(("i1", value))
        elif isinstance(value, int):
            signature.append(_int_property(value, name not in kernel.unspecialized))
        else:
            signature.append("fp32")
    return (kernel.name, tuple(signature), tuple(sorted(meta.items())))


class SpecializationCounter:
    """The distinct specialization keys of the launches made while it is active."""

    def __init__(self, launch: bool):
        self.launch = launch
        self.keys = set()
        self._lock = threading.Lock()

    def record(self, kernel: Kernel, args, meta) -> None:
        key = specialization_key(kernel, args, meta)
        with self._lock:
            self.keys.add(key)

    def per_kernel(self) -> dict:
        counts = {}
        for key in self.keys:
            counts[key[0]] = counts.get(key[0], 0) + 1
        return dict(sorted(counts.items()))


_counter: Optional[SpecializationCounter] = None


@contextlib.contextmanager
def count_specializations(launch: bool = True):
    """Record every launch's specialization key; with launch=False nothing runs (the outputs stay
    as allocated): the count of a workload too large or too slow to run here."""
    global _counter
    previous, _counter = _counter, SpecializationCounter(launch)
    try:
        yield _counter
    finally:
        _counter = previous


stats = Kernel(kernels._bn_fwd_stats_kernel)
stats_combine = Kernel(kernels._bn_fwd_stats_combine_kernel)
fwd_apply = Kernel(kernels._bn_act_fwd_apply_kernel)
bwd_reduce = Kernel(kernels._bn_act_bwd_reduce_kernel)
bwd_reduce_combine = Kernel(kernels._bn_act_bwd_reduce_combine_kernel)
bwd_apply = Kernel(kernels._bn_act_bwd_apply_kernel)
