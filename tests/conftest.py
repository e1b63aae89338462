"""Fixtures and collection rules of the suite: the backend fixture (every backend available on the
machine), NaN-poisoned allocations, one intra-op thread for whole-model tests, and the Triton
interpreter's marker. What the tests share otherwise is in helpers.py.
"""

import os

import pytest
import torch

from helpers import BACKENDS, TRITON_INTERPRETED  # first: decides TRITON_INTERPRET

import fused_resnet  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "triton_interpreter(reason, skip=False, only=None, half_fraction=None): how the test's triton "
        "cases run under the Triton interpreter: skip=True leaves them out; only={param: values} keeps "
        "the cases whose parameter takes one of the values; half_fraction=(param, ...), parameters of "
        "two values each (after `only`), keeps the half of their combinations whose value indices add "
        "up to an even number",
    )


def _interpreter_skip_reason(item):
    """Why a triton case does not run under the Triton interpreter, or None if it runs: the
    interpreter gives NaN for bfloat16, and the test's triton_interpreter marker says the rest."""
    params = item.callspec.params
    if any(torch.bfloat16 in (v if isinstance(v, tuple) else (v,)) for v in params.values()):
        return "the Triton interpreter gives NaN for bfloat16 (a CUDA run covers it)"
    marker = item.get_closest_marker("triton_interpreter")
    if marker is None:
        return None
    reason = marker.kwargs["reason"]
    if marker.kwargs.get("skip"):
        return reason
    only = marker.kwargs.get("only") or {}
    if any(params.get(name) not in values for name, values in only.items()):
        return reason
    half = marker.kwargs.get("half_fraction")
    if half and sum(_two_level_index(item, name, only) for name in half) % 2:
        return reason
    return None


def _two_level_index(item, name, only):
    """0 or 1: which of its two values the case's parameter `name` takes (of `only`'s values where
    it names the parameter). A half fraction of n two-level parameters (the combinations whose
    indices add up to an even number) still holds every combination of the values of any n - 1 of
    them: every pair of values appears, with half the cases."""
    values = only.get(name) or next(
        mark.args[1] for mark in item.iter_markers("parametrize") if mark.args[0] == name
    )
    index = list(values).index(item.callspec.params[name])
    assert index in (0, 1), f"half_fraction: {name} takes more than two values"
    return index


def pytest_collection_modifyitems(config, items):
    if not TRITON_INTERPRETED:
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "triton" not in (callspec.params.get("backend"), callspec.params.get("backend_name")):
            continue
        reason = _interpreter_skip_reason(item)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(params=BACKENDS)
def backend(request):
    with fused_resnet.use_backend(request.param):
        yield request.param


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: whole models under pytest-xdist on a 2-core machine, where
    two workers with two OpenMP threads each oversubscribe the cores and a model step takes 4 to
    20 times longer (the model zoo's new cases: 150 s with -n 2, 34 s on one thread each). The
    kernel tests keep every thread, so the kernels' parallel splits stay covered."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every uninitialized allocation (torch.empty, at::empty in the kernels) is filled with NaN.

    torch fills memory it hands out uninitialized when deterministic algorithms are on, so an
    output element that a kernel forgets to write reads as NaN and fails the comparison.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill


def pytest_runtest_logreport(report):
    """With FUSED_RESNET_FAILURES=PATH, every failure is appended to PATH as it happens (id, phase,
    the end of its report): a GPU run cut off by its time limit still says which tests failed and
    why, where pytest's own summary and junit xml come only at the end. Written by the process
    that reports (the xdist controller, or pytest alone), once per failure."""
    path = os.environ.get("FUSED_RESNET_FAILURES")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with open(path, "a") as f:
        f.write(f"=== {report.nodeid} [{report.when}]\n{report.longreprtext[-2500:]}\n\n")
