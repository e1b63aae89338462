"""The fused modules against eager nn.BatchNorm (+ add) + ReLU, in float64, over several steps.

Compared at every step: the output, the gradients of input, residual, weight and bias, the running
mean and variance, and num_batches_tracked.
"""

import pytest
import torch

from helpers import (
    CONFIGS,
    DEVICE,
    DTYPES,
    assert_close,
    check_state,
    eager_bn_class,
    eager_step,
    fused_class,
    layouts_for,
    make_pair,
    make_tensor,
    randomize_affine,
    act_mask,
    run_against_eager,
    sum_atol_scale,
)

SHAPES = [
    (7, 3),  # 1D, (N, C)
    (4, 19, 5),  # 1D, (N, C, L)
    (3, 1, 7),  # one channel
    (2, 3, 5, 7),  # 2D
    (3, 19, 1, 1),  # spatial 1
    (3, 4, 6, 6),
    (2, 3, 3, 5, 7),  # 3D
    (1, 5, 2, 3, 3),
]
SHAPE_LAYOUTS = [(s, l) for s in SHAPES for l in layouts_for(s)]

# Under the interpreter: every shape and layout, with the two configs that differ in every flag
# (the other configs only change what the module does around the op), and of dtype x residual x
# config x training the half fraction that holds every pair of their values.
@pytest.mark.triton_interpreter(
    reason="the Triton interpreter runs the 'default' and 'no_affine_no_track_cumulative' configs, "
    "and half of their dtype x residual x config x training combinations (every pair of values)",
    only={"config": [CONFIGS["default"], CONFIGS["no_affine_no_track_cumulative"]]},
    half_fraction=("dtypes", "residual", "config", "training"),
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add_relu"])
@pytest.mark.parametrize("dtypes", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape,layout", SHAPE_LAYOUTS, ids=[f"{s}-{l}" for s, l in SHAPE_LAYOUTS])
def test_module_matches_eager(backend, shape, layout, dtypes, residual, config, training):
    # eval without running statistics normalizes with batch statistics, as nn.BatchNorm does
    run_against_eager(shape, layout, residual, config, dtypes, training)


@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32], ids=["fp16params", "fp32params"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_inputs(backend, layout, training, param_dtype):
    run_against_eager((3, 5, 4, 6), layout, True, CONFIGS["default"], (torch.float16, param_dtype), training)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bf16_params_same_dtype(backend, training):
    run_against_eager((3, 5, 4, 6), "channels_last", True, CONFIGS["default"], (torch.bfloat16,) * 2, training)


@pytest.mark.parametrize(
    "shape,layout",
    [((4, 2, 48, 48), "contiguous"), ((4, 3, 40, 40), "channels_last"), ((600, 2), "contiguous")],
)
def test_long_channels_split_reduction(backend, shape, layout):
    """Few channels with many values each: the per-channel reduction is split and recombined."""
    run_against_eager(shape, layout, True, CONFIGS["default"], DTYPES["fp32"], True, steps=2)


def test_state_dict_loads_both_ways(backend):
    for ndim in (2, 4, 5):
        for residual in (False, True):
            eager = eager_bn_class(ndim)(6)
            randomize_affine(eager)
            eager.running_mean.normal_()
            eager.num_batches_tracked.fill_(5)
            fused = fused_class(ndim, residual)(6)
            fused.load_state_dict(eager.state_dict(), strict=True)
            back = eager_bn_class(ndim)(6)
            back.load_state_dict(fused.state_dict(), strict=True)
            for key, value in eager.state_dict().items():
                assert torch.equal(back.state_dict()[key], value), key
            assert isinstance(fused, eager_bn_class(ndim))


def test_empty_batch_matches_eager(backend):
    eager = torch.nn.BatchNorm2d(3).to(DEVICE)
    fused = fused_class(4, True)(3).to(DEVICE)
    for training in (True, False):
        eager.train(training)
        fused.train(training)
        x = torch.randn(0, 3, 4, 4, device=DEVICE, requires_grad=True)
        r = torch.randn(0, 3, 4, 4, device=DEVICE, requires_grad=True)
        out = fused(x, r)
        ref = torch.relu(eager(x.detach()) + r.detach())
        assert out.shape == ref.shape == (0, 3, 4, 4)
        out.sum().backward()
        assert x.grad.shape == x.shape and r.grad.shape == r.shape
        if training:
            assert torch.equal(fused.weight.grad, torch.zeros(3, device=DEVICE))
            assert torch.equal(fused.bias.grad, torch.zeros(3, device=DEVICE))
        assert torch.equal(fused.running_mean, eager.running_mean)
        assert torch.equal(fused.running_var, eager.running_var)
        assert int(fused.num_batches_tracked) == int(eager.num_batches_tracked)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nan_stays_in_its_channel(backend, layout, training):
    eager = torch.nn.BatchNorm2d(4).to(DEVICE, torch.float64)
    fused = fused_class(4, False)(4).to(DEVICE)
    eager.train(training)
    fused.train(training)
    x = make_tensor((3, 4, 5, 5), torch.float32, layout)
    x[1, 2, 3, 4] = float("nan")
    out = fused(x)
    ref = torch.relu(eager(x.double()))
    # training: the whole of channel 2 is NaN (its statistics are); eval: only that element
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[:, 2].isnan().all() == training
    others = [0, 1, 3]
    assert_close(out[:, others], ref[:, others], torch.float32, "other channels")
    assert_close(fused.running_mean[others], eager.running_mean[others], torch.float32, "running_mean")
    assert fused.running_mean[2].isnan() == training


@pytest.mark.triton_interpreter(
    reason="CPU kernels' streaming-store thresholds; too large for the Triton interpreter (a CUDA run covers it)",
    skip=True,
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_activations(backend, layout, training):
    """Activations past the CPU kernels' streaming-store and huge-page thresholds (40 MiB, 4 MiB),
    from an input that starts at an odd storage offset."""
    shape = (2, 6, 520, 700)  # 4.4M elements: 17.5 MB per fp32 activation, 52-87 MB per op
    eager, fused = make_pair(4, 6, True, CONFIGS["default"], torch.float32)
    eager.train(training)
    fused.train(training)
    base = make_tensor((shape[0] * shape[1] * shape[2] * shape[3] + 1,), torch.float32, scale=1.5)
    x = base[1:].view(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    r = make_tensor(shape, torch.float32, layout).requires_grad_()
    grad_out = make_tensor(shape, torch.float32)
    out = fused(x, r)
    out.backward(grad_out)
    mask = act_mask(out.detach())
    ref_out, ref_gx, ref_gr = eager_step(eager, x, r, grad_out, mask)
    assert_close(out, ref_out, torch.float32, "output")
    assert_close(x.grad, ref_gx, torch.float32, "grad_input")
    assert_close(r.grad, ref_gr, torch.float32, "grad_residual")
    # grad_weight sums 728,000 products per channel: compare within the rounding of such a sum
    x64 = x.detach().double()
    if training:
        mean, var = x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3), correction=0)
    else:
        mean, var = eager.running_mean, eager.running_var
    xhat = (x64 - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + eager.eps)
    scale = sum_atol_scale(grad_out.double() * mask * xhat, torch.float32)
    assert_close(fused.weight.grad, eager.weight.grad, torch.float32, "grad_weight", atol_scale=scale)
    check_state(fused, eager, torch.float32, "step 0")
