"""Which implementation runs the fused ops: "auto" | "reference" | "cpu" | "cuda" | "triton".

The choice is process-wide: `set_backend(name)`, the context manager `use_backend(name)`, or the
environment variable FUSED_RESNET_BACKEND read at first use. "auto" picks the fastest backend that
can run the input's device (the order in `_AUTO_PREFERENCE`). Naming a backend that
cannot run a tensor is an error, never a silent fallback. A backend may run a device without being
an "auto" candidate there: "triton" runs CPU tensors through the Triton interpreter
(TRITON_INTERPRET=1), for testing only.

Backends are registered here by fused_resnet/backends (each the same way, at import); this module
only holds names, availability and the resolution rule. A module call resolves its backend on every call,
so the rule is cached per device type until a selection or registration changes it.
"""

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .contract import OpSet

ENV_VAR = "FUSED_RESNET_BACKEND"
BACKEND_NAMES = ("auto", "reference", "cpu", "cuda", "triton")

# Fastest first, per device type. "auto" takes the first one that is available; backends not
# listed for a device type are never picked by "auto" there. On CUDA the C++ kernels come before
# Triton until a measured comparison says otherwise (benchmarks/results/): reorder here.
_AUTO_PREFERENCE = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}


@dataclass
class Backend:
    """One implementation of the op set (fused_resnet/contract.py names the ops)."""

    name: str
    device_types: tuple  # device types whose tensors it runs, e.g. ("cpu",)
    ops: OpSet
    # act_mask_bytes(input, act): the length of the act_mask its bn_act_fwd_train returns for input
    act_mask_bytes: Callable


_registry: Dict[str, Backend] = {}
_unavailable: Dict[str, str] = {
    "cpu": "the C++ extension fused_resnet._C is not built",
    "cuda": "the C++ extension was built without CUDA kernels",
    "triton": "the Triton backend was not loaded (fused_resnet/triton)",
}
_selected: Optional[str] = None  # None: take the environment variable, else "auto"
_from_environment: Optional[str] = None  # the environment variable's choice, read at first use
_resolved: Dict[str, Backend] = {}  # device type -> backend, under the current selection


def register(backend: Backend) -> None:
    _registry[backend.name] = backend
    _unavailable.pop(backend.name, None)
    _resolved.clear()


def mark_unavailable(name: str, reason: str) -> None:
    _registry.pop(name, None)
    _unavailable[name] = reason
    _resolved.clear()


def _check_name(name, source: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"unknown fused_resnet backend {name!r} (from {source}); "
            f"expected one of {', '.join(repr(n) for n in BACKEND_NAMES)}"
        )
    if name != "auto" and name not in _registry:
        raise RuntimeError(
            f"fused_resnet backend {name!r} (from {source}) is not available on this machine: "
            f"{_unavailable.get(name, 'not registered')}"
        )
    return name


def _select(name: Optional[str]) -> None:
    global _selected
    _selected = name
    _resolved.clear()


def set_backend(name: str) -> None:
    """Select the backend for every later call; "auto" restores the per-device choice."""
    _select(_check_name(name, "set_backend"))


def get_backend() -> str:
    """The selected backend name ("auto" unless set_backend/use_backend/the env var say otherwise)."""
    global _from_environment
    if _selected is not None:
        return _selected
    if _from_environment is None:
        _from_environment = _check_name(os.environ.get(ENV_VAR, "auto"), f"the environment variable {ENV_VAR}")
    return _from_environment


@contextlib.contextmanager
def use_backend(name: str):
    """Run the body with `name` selected, then restore the previous selection."""
    previous = _selected
    _select(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _select(previous)


def _runs(name: str, device_type: str) -> bool:
    return name in _registry and device_type in _registry[name].device_types


def _auto_candidates(device_type: str) -> List[str]:
    return [n for n in _AUTO_PREFERENCE.get(device_type, ("reference",)) if _runs(n, device_type)]


def available_backends(device=None) -> List[str]:
    """Concrete backends available on this machine; only those that run `device` if given, "auto"'s
    candidates first (fastest first), then the others (e.g. "triton" on CPU tensors under the
    Triton interpreter)."""
    if device is None:
        return [n for n in BACKEND_NAMES if n in _registry]
    device_type = torch.device(device).type
    preferred = _auto_candidates(device_type)
    others = [n for n in BACKEND_NAMES if n != "auto" and n not in preferred and _runs(n, device_type)]
    return preferred + others


def resolve(device: torch.device) -> Backend:
    """The backend that runs tensors on `device` under the current selection."""
    backend = _resolved.get(device.type)
    if backend is None:
        backend = _resolved[device.type] = _resolve_uncached(device)
    return backend


def ops_for(input: torch.Tensor) -> OpSet:
    """The op set that runs `input` under the current selection (the module calls' fast path)."""
    try:
        device = input.device
    except AttributeError:
        raise TypeError(f"fused_resnet: expected input to be a Tensor, got {type(input).__name__}") from None
    backend = _resolved.get(device.type)
    return (backend if backend is not None else resolve(device)).ops


def _resolve_uncached(device: torch.device) -> Backend:
    name = get_backend()
    if name == "auto":
        candidates = _auto_candidates(device.type)
        if not candidates:
            raise RuntimeError(f"no fused_resnet backend can run tensors on device {device}")
        return _registry[candidates[0]]
    backend = _registry[name]
    if device.type not in backend.device_types:
        raise RuntimeError(
            f"fused_resnet backend {name!r} cannot run tensors on device {device} "
            f"(it runs {', '.join(backend.device_types)} tensors); backends for {device.type}: "
            f"{available_backends(device)}"
        )
    return backend
