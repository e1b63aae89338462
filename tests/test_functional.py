"""fused_resnet.functional against F.batch_norm (+ add) + relu: results and running-stat side effects."""

import pytest
import torch
import torch.nn.functional as F

import fused_resnet
from helpers import DEVICE, assert_close, make_tensor


def _stats(channels, dtype=torch.float32):
    mean = torch.randn(channels, dtype=dtype, device=DEVICE)
    var = torch.rand(channels, dtype=dtype, device=DEVICE) + 0.5
    return mean, var


@pytest.mark.parametrize("momentum", [0.1, 0.7])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add_relu"])
def test_functional_matches_f_batch_norm(backend, residual, training, momentum):
    shape = (4, 6, 5, 3)
    x = make_tensor(shape, torch.float64)
    r = make_tensor(shape, torch.float64) if residual else None
    weight, bias = torch.randn(6, dtype=torch.float64, device=DEVICE), torch.randn(6, dtype=torch.float64, device=DEVICE)
    rm, rv = _stats(6, torch.float64)
    ref_rm, ref_rv, initial_rm = rm.clone(), rv.clone(), rm.clone()

    if residual:
        out = fused_resnet.functional.batch_norm_add_relu(
            x, r, rm, rv, weight, bias, training=training, momentum=momentum, eps=1e-3
        )
    else:
        out = fused_resnet.functional.batch_norm_relu(
            x, rm, rv, weight, bias, training=training, momentum=momentum, eps=1e-3
        )
    ref = F.batch_norm(x, ref_rm, ref_rv, weight, bias, training=training, momentum=momentum, eps=1e-3)
    ref = F.relu(ref + r if residual else ref)
    assert_close(out, ref, torch.float64, "output")
    assert_close(rm, ref_rm, torch.float64, "running_mean")
    assert_close(rv, ref_rv, torch.float64, "running_var")
    assert torch.equal(rm, initial_rm) != training  # updated in training only


def test_functional_training_without_running_stats(backend):
    x = make_tensor((5, 3, 4), torch.float32)
    out = fused_resnet.functional.batch_norm_relu(x, None, None, training=True)
    ref = F.relu(F.batch_norm(x.double(), None, None, training=True))
    assert_close(out, ref, torch.float32, "output")


def test_functional_positional_order_matches_f_batch_norm(backend):
    """Arguments are positional in F.batch_norm's order, residual right after input."""
    x = make_tensor((3, 2, 4), torch.float64)
    r = make_tensor((3, 2, 4), torch.float64)
    rm, rv = _stats(2, torch.float64)
    w, b = torch.rand(2, dtype=torch.float64, device=DEVICE) + 0.5, torch.randn(2, dtype=torch.float64, device=DEVICE)
    out = fused_resnet.functional.batch_norm_add_relu(x, r, rm, rv, w, b, False, 0.1, 1e-2)
    ref = F.relu(F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-2) + r)
    assert_close(out, ref, torch.float64, "output")


def test_update_running_stats_is_the_eager_formula():
    mean, var = torch.randn(4, dtype=torch.float64, device=DEVICE), torch.rand(4, dtype=torch.float64, device=DEVICE)
    rm, rv = _stats(4, torch.float64)
    expected_rm = 0.9 * rm + 0.1 * mean
    expected_rv = 0.9 * rv + 0.1 * var * 10 / 9
    fused_resnet.functional.update_running_stats(rm, rv, mean, var, 10, 0.1)
    assert_close(rm, expected_rm, torch.float64, "running_mean")
    assert_close(rv, expected_rv, torch.float64, "running_var")


def test_update_running_stats_of_reduced_precision_buffers_is_computed_in_float32():
    # bf16 buffers with fp32 batch statistics (a bf16 model): the update runs in fp32, rounded once.
    mean, var = torch.randn(4, device=DEVICE), torch.rand(4, device=DEVICE)
    rm = torch.randn(4, device=DEVICE).to(torch.bfloat16)
    rv = (torch.rand(4, device=DEVICE) + 0.5).to(torch.bfloat16)
    expected_rm = (0.9 * rm.float() + 0.1 * mean).to(torch.bfloat16)
    expected_rv = (0.9 * rv.float() + 0.1 * var * 10 / 9).to(torch.bfloat16)
    fused_resnet.functional.update_running_stats(rm, rv, mean, var, 10, 0.1)
    assert rm.dtype == rv.dtype == torch.bfloat16
    assert_close(rm, expected_rm, torch.bfloat16, "running_mean")
    assert_close(rv, expected_rv, torch.bfloat16, "running_var")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add_relu"])
def test_strided_and_expanded_per_channel_vectors(backend, residual, training, layout):
    """Per-channel vectors are read through their own strides: a strided weight (every other
    element of a larger tensor), an expanded bias (stride 0) and strided running statistics,
    updated in place through the view; outputs, gradients (reaching the viewed tensors) and
    running statistics as eager's, float64."""
    shape, c = (3, 5, 4, 3), 5
    x = make_tensor(shape, torch.float64, layout).requires_grad_()
    r = make_tensor(shape, torch.float64, layout) if residual else None
    weight_base = (torch.rand(2 * c, dtype=torch.float64, device=DEVICE) + 0.5).requires_grad_()
    bias_base = torch.randn((), dtype=torch.float64, device=DEVICE).requires_grad_()
    stats_base = torch.stack([torch.randn(2 * c, dtype=torch.float64, device=DEVICE),
                              torch.rand(2 * c, dtype=torch.float64, device=DEVICE) + 0.5], dim=1)
    ref_stats_base = stats_base.clone()
    weight, bias = weight_base[::2], bias_base.expand(c)
    rm, rv = stats_base[::2, 0], stats_base[::2, 1]  # strides 4
    assert weight.stride(0) == 2 and bias.stride(0) == 0 and rm.stride(0) == 4

    args = (rm, rv, weight, bias, training, 0.3, 1e-3)
    out = (fused_resnet.functional.batch_norm_add_relu(x, r, *args) if residual
           else fused_resnet.functional.batch_norm_relu(x, *args))
    grad_out = make_tensor(shape, torch.float64)
    grads = torch.autograd.grad(out, (x, weight_base, bias_base), grad_out)

    # The oracle runs on contiguous copies of the vectors (the gradients still reach the bases,
    # the running statistics are written back into the viewed places): eager's CPU kernels are
    # wrong for a channels_last input with strided vectors (torch 2.14: grad_input off by O(1) with
    # a strided weight, the eval output with strided running statistics).
    x_ref = x.detach().clone().requires_grad_()
    ref_rm, ref_rv = ref_stats_base[::2, 0].clone(), ref_stats_base[::2, 1].clone()
    ref = F.batch_norm(x_ref, ref_rm, ref_rv, weight_base[::2].contiguous(), bias_base.expand(c).contiguous(),
                       training, 0.3, 1e-3)
    ref = F.relu(ref + r if residual else ref)
    ref_stats_base[::2, 0], ref_stats_base[::2, 1] = ref_rm, ref_rv
    ref_grads = torch.autograd.grad(ref, (x_ref, weight_base, bias_base), grad_out)
    assert_close(out, ref, torch.float64, "output")
    for name, got, expected in zip(("grad_input", "grad_weight", "grad_bias"), grads, ref_grads):
        assert_close(got, expected, torch.float64, name)
    assert_close(stats_base, ref_stats_base, torch.float64, "running statistics (and their neighbours)")
