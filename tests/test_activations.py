"""Every activation (contract.ACTIVATIONS) on every backend, against eager PyTorch in float64:
BatchNormAct*d / BatchNormAddAct*d against nn.BatchNorm*d (+ the residual) and then the
activation as torch.nn.functional computes it, step by step in training and in eval: outputs,
grad_input, grad_residual, grad_weight, grad_bias, running statistics.

The cross-product (activation x residual x rank x layout) runs in float64 on the compiled and
reference backends, where a kink (relu and leaky_relu at 0, relu6 at 0 and 6) is met only by
values that are exactly on it; the Triton interpreter and float32 take a sample. In float32 a
pre-activation within rounding of a kink may fall on either side in the fused op and in eager:
the oracle then takes the side from the fused output, as helpers.eager_step does for the ReLU,
and the output comparison checks that side against eager's.
"""

import pytest
import torch

import fused_resnet
from fused_resnet import contract
from fused_resnet.reference import activation
from helpers import (
    BACKENDS,
    DEVICE,
    TRITON_INTERPRETED,
    assert_close,
    check_state,
    eager_bn_class,
    grad_input_gain,
    make_tensor,
    memory_format_of,
    randomize_affine,
)

ACTIVATIONS = contract.ACTIVATIONS
SLOPE = 0.2  # leaky_relu's negative_slope in these tests (nn.LeakyReLU's default is 0.01)

SHAPES = {  # rank: a shape with odd sizes
    2: (7, 5),
    3: (3, 5, 7),
    4: (2, 3, 5, 7),
    5: (2, 3, 3, 4, 5),
}


def _fused_module(ndim, channels, residual, act, **kwargs):
    d = {2: 1, 3: 1, 4: 2, 5: 3}[ndim]
    cls = getattr(fused_resnet.nn, f"BatchNorm{'AddAct' if residual else 'Act'}{d}d")
    return cls(channels, act=act, negative_slope=SLOPE, **kwargs)


def _side_multiplier(out, act):
    """d out / dz of a piecewise-linear activation, on the side of the kink the fused output is."""
    one, zero = torch.ones_like(out), torch.zeros_like(out)
    if act == "relu":
        return torch.where(out <= 0, zero, one)
    if act == "relu6":
        return torch.where((out <= 0) | (out >= 6), zero, one)
    return torch.where(out > 0, one, one * SLOPE)  # leaky_relu


def _eager_step(eager_bn, x, residual, grad_out, act, fused_out):
    """The float64 eager oracle of one step: (out, grad_x, grad_residual); parameter gradients
    accumulate in eager_bn. Piecewise-linear activations differentiate on the fused output's side."""
    x64 = x.detach().double().requires_grad_(True)
    r64 = None if residual is None else residual.detach().double().requires_grad_(True)
    z = eager_bn(x64)
    if r64 is not None:
        z = z + r64
    if contract.backward_reads_out(act):
        out = activation(z, act, SLOPE)
        z.backward(grad_out.double() * _side_multiplier(fused_out.double(), act))
    else:
        out = activation(z, act, SLOPE)
        out.backward(grad_out.double())
    return out.detach(), x64.grad, None if r64 is None else r64.grad


def run_against_eager(backend_name, act, residual, shape, layout, dtype, training, steps=2):
    channels = shape[1]
    fused = _fused_module(len(shape), channels, residual, act).to(device=DEVICE, dtype=dtype)
    randomize_affine(fused)
    with torch.no_grad():
        fused.running_mean.normal_()
        fused.running_var.uniform_(0.5, 2.0)
    eager = eager_bn_class(len(shape))(channels).to(device=DEVICE, dtype=torch.float64)
    eager.load_state_dict(fused.state_dict())
    fused.train(training)
    eager.train(training)
    with fused_resnet.use_backend(backend_name):
        for step in range(steps):
            what = f"{act}, step {step}"
            # scale 3: the pre-activations reach past relu6's 6 and hardswish's ±3
            x = make_tensor(shape, dtype, layout, scale=3.0, offset=0.3).requires_grad_()
            r = make_tensor(shape, dtype, layout).requires_grad_() if residual else None
            grad_out = make_tensor(shape, dtype)
            out = fused(x, r) if residual else fused(x)
            assert out.dtype == dtype and out.shape == x.shape
            assert memory_format_of(out) == memory_format_of(x.detach().contiguous(memory_format=memory_format_of(x)))
            out.backward(grad_out)
            ref_out, ref_gx, ref_gr = _eager_step(eager, x, r, grad_out, act, out.detach())
            assert_close(out, ref_out, dtype, f"{what}: output")
            gain = grad_input_gain(x, fused.weight) if training else 1.0
            assert_close(x.grad, ref_gx, dtype, f"{what}: grad_input", atol_scale=gain)
            if residual:
                assert_close(r.grad, ref_gr, dtype, f"{what}: grad_residual")
            assert_close(fused.weight.grad, eager.weight.grad, dtype, f"{what}: grad_weight")
            assert_close(fused.bias.grad, eager.bias.grad, dtype, f"{what}: grad_bias")
            for m in (fused, eager):
                m.weight.grad = m.bias.grad = None
            check_state(fused, eager, dtype, what)


def _layouts(ndim):
    return ("contiguous", "channels_last") if ndim >= 4 else ("contiguous",)


FLOAT64_CASES = [
    (act, residual, ndim, layout)
    for act in ACTIVATIONS
    for residual in (False, True)
    for ndim in SHAPES
    for layout in _layouts(ndim)
]
FAST_BACKENDS = [b for b in BACKENDS if b != "triton" or not TRITON_INTERPRETED]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act,residual,ndim,layout", FLOAT64_CASES,
                         ids=[f"{a}-{'add' if r else 'noadd'}-{n}d-{l}" for a, r, n, l in FLOAT64_CASES])
@pytest.mark.parametrize("backend_name", FAST_BACKENDS)
def test_float64_every_activation(backend_name, act, residual, ndim, layout, training):
    run_against_eager(backend_name, act, residual, SHAPES[ndim], layout, torch.float64, training)


# The Triton interpreter (seconds a case) and float32: every activation once, residual and
# layout alternating.
SAMPLE_CASES = [
    (act, i % 2 == 0, 4 if i % 3 else 5, "channels_last" if i % 2 else "contiguous")
    for i, act in enumerate(ACTIVATIONS)
]


@pytest.mark.parametrize("act,residual,ndim,layout", SAMPLE_CASES,
                         ids=[f"{a}-{'add' if r else 'noadd'}-{n}d-{l}" for a, r, n, l in SAMPLE_CASES])
def test_triton_interpreted_sample(act, residual, ndim, layout):
    if "triton" not in BACKENDS:
        pytest.skip("no triton backend for these tensors")
    run_against_eager("triton", act, residual, SHAPES[ndim], layout, torch.float64, training=True, steps=1)


@pytest.mark.parametrize("act,residual,ndim,layout", SAMPLE_CASES,
                         ids=[f"{a}-{'add' if r else 'noadd'}-{n}d-{l}" for a, r, n, l in SAMPLE_CASES])
@pytest.mark.parametrize("backend_name", FAST_BACKENDS)
def test_float32_sample(backend_name, act, residual, ndim, layout):
    run_against_eager(backend_name, act, residual, SHAPES[ndim], layout, torch.float32, training=True)


# The CPU kernels take planes shorter than 4 vectors (S < 32 in float32, S < 16 in float64 at AVX2)
# in blocks of channels of at most 1024 positions (csrc/cpu/plans.h, ShortPlaneBlocks: the forward's
# statistics and apply, the backward's sums and apply): channels that fill more than one block,
# the last one partly (S = 4: 256 channels a block; S = 16: 64; S = 5: 204, blocks of 1020).
@pytest.mark.parametrize("shape", [(3, 300, 2, 2), (2, 70, 4, 4), (2, 230, 5)],
                         ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("act", ["silu", "relu6"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend_name", FAST_BACKENDS)
def test_short_planes_over_several_channel_blocks(backend_name, dtype, act, shape):
    for training in (True, False):
        run_against_eager(backend_name, act, True, shape, "contiguous", dtype, training, steps=1)


# ---------------------------------------------------------------------------------------------
# The kinks: values exactly on them, judged against float64 (torch's own backward formulas).


@pytest.mark.parametrize("act", ["relu", "relu6", "leaky_relu", "hardswish"])
@pytest.mark.parametrize("backend_name", FAST_BACKENDS)
def test_values_on_the_kinks_follow_eager(backend_name, act):
    """Eval with identity statistics (mean 0, var 1, eps 0, w 1, b 0): z = x exactly, so x can
    be put on every kink; output and grad_input are eager's bit for bit in float64."""
    kinks = torch.tensor([-3.0, -1.0, 0.0, 0.5, 3.0, 6.0, 7.0], dtype=torch.float64, device=DEVICE)
    x = kinks.repeat(2, 1).reshape(2, 7, 1).requires_grad_()
    module = _fused_module(3, 7, False, act, eps=0.0).to(device=DEVICE, dtype=torch.float64).eval()
    with fused_resnet.use_backend(backend_name):
        out = module(x)
        (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    x64 = x.detach().clone().requires_grad_()
    ref = activation(x64, act, SLOPE)
    (ref_grad,) = torch.autograd.grad(ref, x64, torch.ones_like(ref))
    # exact for the piecewise-linear ones; hardswish's products may round in another order
    tolerance = dict(atol=1e-15, rtol=0) if act == "hardswish" else dict(atol=0, rtol=0)
    torch.testing.assert_close(out.detach(), ref.detach(), **tolerance)
    if act == "hardswish":
        # At exactly -3 and 3 eager's CPU and CUDA kernels take different sides (CPU: 0 at -3 and
        # 1 at 3; CUDA: -1/2 and 3/2), both one-sided derivatives; each is right there.
        at_kink = x.detach().abs() == 3
        one_sided = {-3.0: (0.0, -0.5), 3.0: (1.5, 1.0)}
        for value, g in zip(x.detach()[at_kink].tolist(), grad[at_kink].tolist()):
            assert g in one_sided[value], (value, g)
        grad, ref_grad = grad[~at_kink], ref_grad[~at_kink]
    torch.testing.assert_close(grad, ref_grad, **tolerance)


# ---------------------------------------------------------------------------------------------
# What the backward keeps.


@pytest.mark.parametrize("act", ["silu", "gelu", "hardswish", "relu6", "identity"])
@pytest.mark.parametrize("backend_name", [b for b in BACKENDS if b != "reference"])
def test_the_backward_keeps_no_pre_activation(backend_name, act):
    """Saved for the backward by one fused call: the input (and the output only where the
    activation's backward reads it), never a tensor of z; eager keeps its BatchNorm's output
    besides for every activation but identity."""
    x = make_tensor((2, 4, 5, 5), torch.float32).requires_grad_()
    module = _fused_module(4, 4, False, act).to(DEVICE)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with fused_resnet.use_backend(backend_name), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    activation_sized = {t.data_ptr() for t in saved if t.shape == x.shape}
    expected = {x.data_ptr()} | ({out.data_ptr()} if contract.backward_reads_out(act) else set())
    assert activation_sized == expected


def test_negative_leaky_slope_is_refused_by_name():
    with pytest.raises(ValueError, match="negative_slope must be >= 0"):
        fused_resnet.nn.BatchNormAct2d(4, act="leaky_relu", negative_slope=-0.1)
    with pytest.raises(ValueError, match="unknown activation 'elu'"):
        fused_resnet.nn.BatchNormAddAct3d(4, act="elu")


def test_modules_keep_the_state_dict_and_repr():
    bn = torch.nn.BatchNorm2d(6)
    fused = fused_resnet.nn.BatchNormAct2d(6, act="leaky_relu", negative_slope=0.3)
    fused.load_state_dict(bn.state_dict())
    bn.load_state_dict(fused.state_dict())
    assert isinstance(fused, torch.nn.BatchNorm2d)
    assert "act='leaky_relu', negative_slope=0.3" in repr(fused)
    assert "act='silu'" in repr(fused_resnet.nn.BatchNormAddAct1d(3, act="silu"))


@pytest.mark.parametrize("act", ["silu", "relu6", "identity"])
def test_frozen_and_unfused_forms_compute_the_same(act):
    module = _fused_module(4, 3, True, act).to(device=DEVICE, dtype=torch.float64)
    randomize_affine(module)
    with torch.no_grad():
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)
    module.eval()
    x, r = make_tensor((2, 3, 4, 4), torch.float64), make_tensor((2, 3, 4, 4), torch.float64)
    frozen = fused_resnet.nn.freeze_batchnorm(module)
    assert isinstance(frozen, fused_resnet.nn.FrozenBatchNormAddAct) and frozen.act == act
    eager = torch.nn.BatchNorm2d(3).to(device=DEVICE, dtype=torch.float64).eval()
    eager.load_state_dict(module.state_dict())
    expected = fused_resnet.nn.activation_module(act, SLOPE)(eager(x) + r)
    torch.testing.assert_close(module(x, r), expected)
    torch.testing.assert_close(frozen(x, r), expected)
