"""What the tests share: the device and backends under test, the tolerance table and how to
compare with it, inputs in every layout, per-channel parameters, the float64 eager oracle of the
modules and its state checks. Test modules import from here (and from parity.py, the whole-model
comparisons), never from each other.

The tests run on CPU tensors unless FUSED_RESNET_TEST_DEVICE=cuda. On CPU tensors the "triton"
backend runs through the Triton interpreter, which TRITON_INTERPRET=1 switches on; it must be set
before triton is imported, so it is set here, before fused_resnet (which imports triton) is, and
conftest.py imports this module first. This is sound for the rest of the suite: the variable only
changes how @triton.jit kernels run, the other backends never launch one on CPU tensors
(torch.compile's inductor generates C++ for CPU, not Triton), and "auto" never picks triton for CPU
tensors. TRITON_INTERPRET=0 in the environment leaves triton out of a CPU run.
"""

import contextlib
import importlib
import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("FUSED_RESNET_TEST_DEVICE", "cpu"))
if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_resnet  # noqa: E402  (after TRITON_INTERPRET is decided)
from fused_resnet.contract import acc_dtype  # noqa: E402

# One (atol, rtol) per input dtype: the table lives in tolerances.py, which scripts import too.
from tolerances import TOLERANCES  # noqa: E402

__all__ = ["acc_dtype", "TOLERANCES"]  # re-exported for the tests

BACKENDS = fused_resnet.available_backends(DEVICE)
# The triton backend runs on the Triton interpreter (CPU tensors): slow, and no bfloat16.
TRITON_INTERPRETED = "triton" in BACKENDS and DEVICE.type == "cpu"
# The backends whose ops are registered ops (the reference backend's are Python functions).
OP_BACKENDS = [b for b in BACKENDS if b != "reference"]


def import_client(name: str):
    """The client library `name` (torchvision, timm), whose models the tests convert. `make
    install` installs both, so in CI (CI set) a missing one is a failure; elsewhere the test
    module that needs it is skipped."""
    return importlib.import_module(name) if os.environ.get("CI") else pytest.importorskip(name)


def dynamo_backend_for(backend_name: str) -> str:
    """torch.compile backend for tests of a fused backend: aot_eager (dynamo capture, the fake
    impls and AOT autograd, where a graph would break), except for Triton under the interpreter,
    whose kernels cannot run on AOT's traced tensors: there dynamo's "eager" (fullgraph capture)."""
    return "eager" if backend_name == "triton" and TRITON_INTERPRETED else "aot_eager"


@contextlib.contextmanager
def no_tf32():
    """float32 convolutions and matmuls in float32 inside the block, the previous settings after.

    On CUDA torch runs float32 cuDNN convolutions in TF32 by default (torch.backends.cudnn.allow_tf32;
    matmuls too where torch.backends.cuda.matmul.allow_tf32 is set): a 10-bit mantissa, ~1e-3
    relative error per convolution, ten times TOLERANCES[torch.float32]. A test that compares float32
    models with convolutions holds both sides to float32 with this. No effect on CPU tensors.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------
# Comparing with the float64 oracle.

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


# ---------------------------------------------------------------------------------------------
# Inputs: fresh random draws in the requested layout.

# The spellings of `bn_out + r` that convert recognizes as the residual add (tests/test_convert*.py):
# the operator on either side, in place, torch.add, the Tensor methods.
def _add_plus(bn_out, r):
    return bn_out + r


def _add_plus_right(bn_out, r):
    return r + bn_out


def _add_iadd(bn_out, r):
    bn_out += r
    return bn_out


def _add_torch(bn_out, r):
    return torch.add(r, bn_out)


def _add_method(bn_out, r):
    return bn_out.add(r)


def _add_method_inplace(bn_out, r):
    return bn_out.add_(r)


ADD_SPELLINGS = {
    f.__name__[len("_add_"):]: f
    for f in (_add_plus, _add_plus_right, _add_iadd, _add_torch, _add_method, _add_method_inplace)
}


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


def act_mask(out):
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


def param_dtype_for(dtype):
    """The dtype of per-channel parameters beside a `dtype` input: float32 for the half types (the
    AMP case), else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def channel_params(channels, dtype, requires_grad=False):
    """(weight, bias, running_mean, running_var) for `channels` channels in `dtype`: weight in
    [0.5, 1.5), bias and running_mean normal, running_var in [0.5, 1.5); weight and bias
    requiring grad when asked."""
    w = (torch.rand(channels, dtype=dtype, device=DEVICE) + 0.5).requires_grad_(requires_grad)
    b = torch.randn(channels, dtype=dtype, device=DEVICE).requires_grad_(requires_grad)
    rm = torch.randn(channels, dtype=dtype, device=DEVICE)
    rv = torch.rand(channels, dtype=dtype, device=DEVICE) + 0.5
    return w, b, rm, rv


def channel_stats(channels, dtype):
    """A per-channel (mean, invstd) in the accumulation dtype of `dtype`, as the forward ops return them."""
    mean = torch.randn(channels, dtype=acc_dtype(dtype), device=DEVICE) * 0.5
    invstd = torch.rand(channels, dtype=acc_dtype(dtype), device=DEVICE) + 0.5
    return mean, invstd


# ---------------------------------------------------------------------------------------------
# The modules against eager nn.BatchNorm (+ add) + ReLU in float64, step by step.

# (affine, track_running_stats, momentum)
CONFIGS = {
    "default": (True, True, 0.1),
    "no_affine": (False, True, 0.1),
    "cumulative": (True, True, None),
    "no_track": (True, False, 0.1),
    "no_affine_no_track_cumulative": (False, False, None),
}

# (input dtype, parameter/running-stat dtype)
DTYPES = {
    "fp64": (torch.float64, torch.float64),
    "fp32": (torch.float32, torch.float32),
    "bf16_fp32params": (torch.bfloat16, torch.float32),
}


def make_pair(ndim, channels, residual, config, param_dtype):
    """The fused module in param_dtype, and the float64 eager module holding exactly its values."""
    affine, track, momentum = config
    kwargs = dict(affine=affine, track_running_stats=track, momentum=momentum)
    fused = fused_class(ndim, residual)(channels, **kwargs).to(device=DEVICE, dtype=param_dtype)
    randomize_affine(fused)
    if track:  # start from non-trivial running statistics
        fused.running_mean.normal_()
        fused.running_var.uniform_(0.5, 2.0)
    eager = eager_bn_class(ndim)(channels, **kwargs).to(device=DEVICE, dtype=torch.float64)
    eager.load_state_dict(fused.state_dict())
    return eager, fused


def check_state(fused, eager, dtype, what):
    """The running statistics and num_batches_tracked of `fused` as `eager`'s; `what` (a step, a
    case) starts every message."""
    for name in ("running_mean", "running_var"):
        mine, ref = getattr(fused, name), getattr(eager, name)
        assert (mine is None) == (ref is None), f"{what}: {name}"
        if mine is not None:
            assert_close(mine, ref, dtype, f"{what}: {name}")
    if eager.num_batches_tracked is not None:
        assert int(fused.num_batches_tracked) == int(eager.num_batches_tracked), f"{what}: num_batches_tracked"


def run_against_eager(shape, layout, residual, config, dtypes, training, steps=3):
    dtype, param_dtype = dtypes
    ndim, channels = len(shape), shape[1]
    eager, fused = make_pair(ndim, channels, residual, config, param_dtype)
    eager.train(training)
    fused.train(training)
    for step in range(steps):
        x = make_tensor(shape, dtype, layout, scale=1.5, offset=0.3).requires_grad_()
        r = make_tensor(shape, dtype, layout).requires_grad_() if residual else None
        grad_out = make_tensor(shape, dtype)

        out = fused(x, r) if residual else fused(x)
        assert out.dtype == dtype and out.shape == x.shape
        if layout == "channels_last":
            assert memory_format_of(out) == memory_format_of(x), "output lost channels_last"
        out.backward(grad_out)

        ref_out, ref_gx, ref_gr = eager_step(eager, x, r, grad_out, act_mask(out.detach()))
        assert_close(out, ref_out, dtype, f"step {step}: output")
        uses_batch_stats = training or eager.running_mean is None
        gain = grad_input_gain(x, fused.weight) if uses_batch_stats else 1.0
        assert_close(x.grad, ref_gx, dtype, f"step {step}: grad_input", atol_scale=gain)
        if residual:
            assert_close(r.grad, ref_gr, dtype, f"step {step}: grad_residual")
        if eager.weight is not None:
            assert fused.weight.grad.dtype == param_dtype
            assert_close(fused.weight.grad, eager.weight.grad, dtype, f"step {step}: grad_weight")
            assert_close(fused.bias.grad, eager.bias.grad, dtype, f"step {step}: grad_bias")
            for m in (fused, eager):
                m.weight.grad = m.bias.grad = None
        check_state(fused, eager, dtype, f"step {step}")
