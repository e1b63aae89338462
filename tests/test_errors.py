"""Bad input gets a clear error that names what is wrong, and a refused call changes no state.

Eager nn.BatchNorm increments num_batches_tracked before it raises; the fused modules must not.
"""

import pytest
import torch

import fused_resnet
from helpers import DEVICE, fused_class, make_tensor


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module, before):
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a refused call"


def _module(ndim, residual, channels=4):
    m = fused_class(ndim, residual)(channels).to(DEVICE)
    m.running_mean.normal_()
    return m


def _bad_cases():
    x = lambda *s, dtype=torch.float32: make_tensor(s, dtype)  # noqa: E731
    return {
        # name: (module ndim, residual?, input, residual, error type, message fragment)
        "wrong_rank_2d": (4, False, x(2, 4, 3), None, ValueError, "expected 4D input (got 3D input)"),
        "wrong_rank_3d": (5, True, x(2, 4, 3, 3), x(2, 4, 3, 3), ValueError, "expected 5D input (got 4D input)"),
        "wrong_rank_1d": (2, False, x(2, 4, 3, 3), None, ValueError, "expected 2D or 3D input (got 4D input)"),
        "channels": (4, False, x(2, 3, 5, 5), None, ValueError, "expected input with 4 channels (num_features), got 3"),
        "residual_shape": (4, True, x(2, 4, 3, 3), x(2, 4, 3, 1), ValueError,
                           "residual shape (2, 4, 3, 1) does not match input shape (2, 4, 3, 3)"),
        "residual_dtype": (4, True, x(2, 4, 3, 3), x(2, 4, 3, 3, dtype=torch.float64), TypeError,
                           "residual dtype torch.float64 does not match input dtype torch.float32"),
        "integer_input": (4, False, torch.randint(0, 5, (2, 4, 3, 3), device=DEVICE), None, TypeError,
                          "expected a floating-point input"),
        "bool_input": (4, False, torch.rand(2, 4, 3, 3, device=DEVICE) > 0.5, None, TypeError,
                       "expected a floating-point input"),
        "one_value_per_channel": (4, True, x(1, 4, 1, 1), x(1, 4, 1, 1), ValueError,
                                  "Expected more than 1 value per channel when training, got input size "
                                  "torch.Size([1, 4, 1, 1])"),
        "one_value_per_channel_1d": (2, False, x(1, 4), None, ValueError,
                                     "Expected more than 1 value per channel when training"),
    }


CASES = _bad_cases()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_without_state_change(backend, case):
    ndim, residual, x, r, error, fragment = CASES[case]
    module = _module(ndim, residual)
    before = _snapshot(module)
    with pytest.raises(error) as info:
        module(x, r) if residual else module(x)
    assert fragment in str(info.value)
    _assert_unchanged(module, before)
    assert int(module.num_batches_tracked) == 0


@pytest.mark.parametrize("eps,training,message", [
    (0.0, True, "eps must be positive when normalizing with batch statistics, got 0"),
    (-1e-3, False, "eps must be non-negative, got -0.001"),
])
def test_an_eps_eager_refuses_is_refused_without_state_change(backend, eps, training, message):
    """A batch's variance can be 0, so training needs eps > 0; eval needs eps >= 0 (F.batch_norm
    raises ValueError on both, in its own words)."""
    x, r = make_tensor((2, 4, 3, 3), torch.float32), make_tensor((2, 4, 3, 3), torch.float32)
    with pytest.raises(ValueError, match="eps must be"):
        torch.nn.BatchNorm2d(4, eps=eps).to(DEVICE).train(training)(x)
    module = fused_class(4, True)(4, eps=eps).to(DEVICE).train(training)
    before = _snapshot(module)
    with pytest.raises(ValueError, match=message):
        module(x, r)
    _assert_unchanged(module, before)


def test_eager_batchnorm_does_change_state_on_the_same_error():
    """Documents the eager behaviour the fused modules improve on (if eager changes, so does this)."""
    eager = torch.nn.BatchNorm2d(4).to(DEVICE)
    with pytest.raises(Exception):
        eager(make_tensor((2, 3, 5, 5), torch.float32))
    assert int(eager.num_batches_tracked) == 1


def test_param_dtype_mismatch(backend):
    module = _module(4, False).double()
    x = make_tensor((2, 4, 3, 3), torch.float32)
    before = _snapshot(module)
    with pytest.raises(TypeError, match="weight dtype torch.float64 is not supported with a torch.float32 input"):
        module(x)
    _assert_unchanged(module, before)


def test_functional_errors(backend):
    f = fused_resnet.functional
    x = make_tensor((2, 3, 4), torch.float32)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match=r"running_mean should hold one value per channel, shape \(3,\)"):
        f.batch_norm_relu(x, torch.zeros(4, device=DEVICE), rv, training=True)
    with pytest.raises(ValueError, match="running_mean and running_var are required when training=False"):
        f.batch_norm_relu(x, None, None, training=False)
    with pytest.raises(ValueError, match="must be given together"):
        f.batch_norm_relu(x, rm, None, training=True)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        f.batch_norm_relu(torch.randn(5, device=DEVICE), None, None, training=True)
    # a non-Tensor is refused by the op's schema (C++ and Triton ops) or the Python contract
    with pytest.raises((TypeError, RuntimeError), match="residual"):
        f.batch_norm_add_relu(x, 1.0, rm, rv)
    # nothing above touched the running statistics
    assert torch.equal(rm, torch.zeros(3, device=DEVICE)) and torch.equal(rv, torch.ones(3, device=DEVICE))


def test_tensors_on_different_devices(backend):
    """A tensor on another device is named in the error. The meta device stands in for a GPU."""
    x = make_tensor((2, 3, 4), torch.float32)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with pytest.raises(RuntimeError, match="but weight is on meta"):
        fused_resnet.functional.batch_norm_relu(x, rm, rv, torch.ones(3, device="meta"), training=True)
    with pytest.raises(RuntimeError, match="but residual is on meta"):
        fused_resnet.functional.batch_norm_add_relu(x, torch.empty(2, 3, 4, device="meta"), rm, rv)
    assert torch.equal(rm, torch.zeros(3, device=DEVICE))
