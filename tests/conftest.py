"""Shared fixtures and helpers: backends, the tolerance table, inputs, and the eager oracle.

The suite is parametrized over every backend available on the machine, for every device present.
FUSED_RESNET_TEST_DEVICE=cuda runs it on CUDA tensors instead of CPU ones.

On CPU tensors the "triton" backend runs through the Triton interpreter, which TRITON_INTERPRET=1
switches on; it must be set before triton is imported, so it is set here, before fused_resnet
(which imports triton) is. This is sound for the rest of the suite: the variable only changes how
@triton.jit kernels run, the other backends never launch one on CPU tensors (torch.compile's
inductor generates C++ for CPU, not Triton), and "auto" never picks triton for CPU tensors.
TRITON_INTERPRET=0 in the environment leaves triton out of a CPU run. Under the interpreter the
triton backend runs a subset of the cases (`pytest_collection_modifyitems` below): it is slow,
and gives NaN for bfloat16.
"""

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("FUSED_RESNET_TEST_DEVICE", "cpu"))
if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_resnet  # noqa: E402  (after TRITON_INTERPRET is decided)
from fused_resnet.reference import acc_dtype  # noqa: E402

BACKENDS = fused_resnet.available_backends(DEVICE)
# The triton backend runs on the Triton interpreter (CPU tensors): slow, and no bfloat16.
TRITON_INTERPRETED = "triton" in BACKENDS and DEVICE.type == "cpu"


def dynamo_backend_for(backend_name: str) -> str:
    """torch.compile backend for tests of a fused backend: aot_eager (dynamo capture, the fake
    impls and AOT autograd, where a graph would break), except for Triton under the interpreter,
    whose kernels cannot run on AOT's traced tensors: there dynamo's "eager" (fullgraph capture)."""
    return "eager" if backend_name == "triton" and TRITON_INTERPRETED else "aot_eager"

# One (atol, rtol) per input dtype: the table lives in tolerances.py, which scripts import too.
from tolerances import TOLERANCES  # noqa: E402


def assert_close(actual, expected, dtype, what, atol_scale=1.0):
    """Compare with the table's tolerances; `atol_scale` widens atol where the quantity is a
    difference of much larger terms (see `grad_input_gain`)."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol * atol_scale, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def grad_input_gain(x, weight):
    """max over channels of |w|·invstd of the batch, at least 1.

    With batch statistics grad_input = w·invstd·(dz - mean(dz) - x̂·mean(dz·x̂)): the bracket is a
    difference of O(|dz|) terms that can cancel to ~0 (exactly 0 when a channel has 2 values), so
    its rounding error is O(eps·|dz|), amplified by w·invstd, which is large when a channel's
    values lie close together. The absolute tolerance of grad_input scales with this factor.
    """
    x64 = x.detach().double()
    dims = [0] + list(range(2, x64.dim()))
    invstd = torch.rsqrt(x64.var(dim=dims, correction=0) + 1e-5)
    w = torch.ones_like(invstd) if weight is None else weight.detach().double().abs()
    return max(1.0, float((w * invstd).max()))


def sum_atol_scale(terms, dtype):
    """atol scale for per-channel sums of many terms, e.g. grad_weight = Σdz·x̂ over N·S values.

    A backend forms and adds each term in its accumulation dtype, every rounding with relative
    error up to eps; over a channel these add up like a random walk to about eps·sqrt(Σ terms²),
    while the sum itself may cancel to far less (the table's rtol then allows nothing). atol is
    widened to 8 such walks where they exceed it: an fp32 total of 10⁶ terms passes, a sum
    that loses the partial sums' precision (an fp32 running total over thousands of blocks,
    ~eps·|partial sum|·sqrt(blocks)) does not.
    """
    t = terms.detach().double()
    dims = [0] + list(range(2, t.dim()))
    norm = float(t.pow(2).sum(dim=dims).sqrt().max())
    eps = torch.finfo(acc_dtype(dtype)).eps
    return max(1.0, 8 * eps * norm / TOLERANCES[dtype][0])


def _interpreter_skip_reason(item):
    """Why a triton case does not run under the Triton interpreter, or None if it runs."""
    params = item.callspec.params
    if any(torch.bfloat16 in (v if isinstance(v, tuple) else (v,)) for v in params.values()):
        return "the Triton interpreter gives NaN for bfloat16 (a CUDA run covers it)"
    if item.originalname == "test_module_matches_eager":
        # The whole matrix of layouts, shapes, dtypes and residual under two configs that differ
        # in every flag; the other configs only change what functional.py does around the ops.
        if params["config"] not in INTERPRETER_CONFIGS:
            return "the Triton interpreter runs the 'default' and 'no_affine_no_track_cumulative' configs"
    if item.originalname in INTERPRETER_SKIPPED_TESTS:
        return INTERPRETER_SKIPPED_TESTS[item.originalname]
    return None


# test_modules.CONFIGS "default" and "no_affine_no_track_cumulative": (affine, track_running_stats, momentum)
INTERPRETER_CONFIGS = [(True, True, 0.1), (False, False, None)]
INTERPRETER_SKIPPED_TESTS = {
    "test_large_activations": "CPU kernels' streaming-store thresholds; too large for the Triton "
    "interpreter (a CUDA run covers it)",
}


def pytest_collection_modifyitems(config, items):
    if not TRITON_INTERPRETED:
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or callspec.params.get("backend") != "triton":
            continue
        reason = _interpreter_skip_reason(item)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(params=BACKENDS)
def backend(request):
    with fused_resnet.use_backend(request.param):
        yield request.param


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


# ---------------------------------------------------------------------------------------------
# Inputs: fresh random draws in the requested layout.

LAYOUTS = ("contiguous", "channels_last", "sliced")


def make_tensor(shape, dtype, layout="contiguous", device=DEVICE, scale=1.0, offset=0.0):
    """Random normal values (never zeros) in the given memory layout.

    "sliced" is a non-contiguous view: every other element of the last dimension of a larger tensor.
    """
    shape = tuple(shape)
    if layout == "sliced":
        big = shape[:-1] + (2 * shape[-1],)
        base = torch.randn(big, dtype=torch.float64, device=device) * scale + offset
        t = base.to(dtype)[..., ::2]
        assert not t.is_contiguous() or shape[-1] == 1
        return t
    t = (torch.randn(shape, dtype=torch.float64, device=device) * scale + offset).to(dtype)
    if layout == "channels_last":
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)]
        t = t.contiguous(memory_format=fmt)
    return t


def layouts_for(shape):
    return [l for l in LAYOUTS if l != "channels_last" or len(shape) in (4, 5)]


def memory_format_of(t):
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def eager_bn_class(ndim):
    return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}[ndim]


def fused_class(ndim, residual):
    d = {2: 1, 3: 1, 4: 2, 5: 3}[ndim]
    name = f"BatchNorm{'AddReLU' if residual else 'ReLU'}{d}d"
    return getattr(fused_resnet.nn, name)


def randomize_affine(module):
    """Non-trivial weight (both signs) and bias, so the affine part is really exercised."""
    if module.weight is not None:
        with torch.no_grad():
            module.weight.copy_(torch.empty_like(module.weight).uniform_(0.5, 1.5))
            module.weight[::3].neg_()
            module.bias.copy_(torch.randn_like(module.bias) * 0.5)


def relu_mask(out):
    """Where relu passes the gradient: exactly aten's threshold_backward (0 where out <= 0)."""
    return ~(out <= 0)


def eager_step(eager_bn, x, residual, grad_out, mask):
    """Run the float64 eager oracle on one step and return (out, grad_x, grad_residual).

    The gradient is taken with the ReLU's pass-through mask of the backend under test: where the
    pre-activation lies within rounding of 0, fp32 and fp64 can legitimately disagree on its sign,
    and one flipped element would change whole gradients. The output comparison checks that the
    backend's output, and so its mask, matches eager's.
    """
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    r64 = None if residual is None else residual.detach().double().requires_grad_(True)
    z = eager_bn(x64)
    if r64 is not None:
        z = z + r64
    out = torch.relu(z)
    z.backward(grad_out.double() * mask.double())
    return out.detach(), x64.grad, None if r64 is None else r64.grad
