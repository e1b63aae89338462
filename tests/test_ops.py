"""The ops themselves: opcheck (schema, fake impls, autograd registration), gradcheck, layouts,
determinism, and the poisoning the whole suite relies on."""

import pytest
import torch

import fused_resnet
from conftest import BACKENDS, DEVICE, TRITON_INTERPRETED, make_tensor, memory_format_of

COMPILED = [b for b in BACKENDS if b != "reference"]
ops = torch.ops.fused_resnet if COMPILED else None


def _gradcheck(backend, fn, inputs):
    # On the Triton interpreter the full numerical Jacobian (two forwards per input element)
    # takes minutes; gradcheck's fast mode checks random projections of it instead.
    fast_mode = backend == "triton" and TRITON_INTERPRETED
    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast_mode)

OP_SAMPLES = [
    # (shape, layout, dtype, residual)
    ((4, 3), "contiguous", torch.float32, False),
    ((3, 5, 7), "sliced", torch.float32, True),
    ((2, 3, 5, 4), "contiguous", torch.float64, True),
    ((2, 3, 5, 4), "channels_last", torch.float32, True),
    ((2, 6, 3, 3, 5), "channels_last", torch.bfloat16, False),
    ((2, 3, 2, 3, 4), "contiguous", torch.float16, True),
]


def _op_args(shape, layout, dtype, residual, requires_grad):
    channels = shape[1]
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = make_tensor(shape, dtype, layout).requires_grad_(requires_grad)
    r = make_tensor(shape, dtype, layout).requires_grad_(requires_grad) if residual else None
    w = (torch.rand(channels, dtype=param_dtype, device=DEVICE) + 0.5).requires_grad_(requires_grad)
    b = torch.randn(channels, dtype=param_dtype, device=DEVICE).requires_grad_(requires_grad)
    rm = torch.randn(channels, dtype=param_dtype, device=DEVICE)
    rv = torch.rand(channels, dtype=param_dtype, device=DEVICE) + 0.5
    return x, r, w, b, rm, rv


@pytest.mark.skipif(not COMPILED, reason="no compiled backend (fused_resnet._C not built)")
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("sample", OP_SAMPLES, ids=[f"{s}-{l}-{str(d)[6:]}-{'add' if r else 'relu'}" for s, l, d, r in OP_SAMPLES])
def test_opcheck(sample, requires_grad):
    x, r, w, b, rm, rv = _op_args(*sample, requires_grad)
    torch.library.opcheck(ops.bn_act_fwd_train.default, (x, r, w, b, 1e-5))
    torch.library.opcheck(ops.bn_act_fwd_eval.default, (x, r, rm, rv, w, b, 1e-5))
    with torch.no_grad():
        out, mean, invstd, _ = ops.bn_act_fwd_train(x, r, w, b, 1e-5)
    grad_out = make_tensor(x.shape, x.dtype)
    # the backward op has no derivative of its own (double backward is refused, tested below)
    for batch_stats in (True, False):
        for residual_grad in (True, False):
            torch.library.opcheck(
                ops.bn_act_bwd.default,
                (grad_out, out, x.detach(), w.detach(), mean, invstd, batch_stats, residual_grad),
            )


@pytest.mark.skipif(not COMPILED, reason="no compiled backend (fused_resnet._C not built)")
def test_ops_do_not_mutate_inputs():
    x, r, w, b, rm, rv = _op_args((3, 4, 5, 5), "channels_last", torch.float32, True, False)
    before = [t.clone() for t in (x, r, w, b, rm, rv)]
    ops.bn_act_fwd_train(x, r, w, b, 1e-5)
    ops.bn_act_fwd_eval(x, r, rm, rv, w, b, 1e-5)
    for t, t0 in zip((x, r, w, b, rm, rv), before):
        assert torch.equal(t, t0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_gradcheck_float64(backend, layout, training):
    shape = (3, 2, 3, 4)
    x, r, w, b, rm, rv = _op_args(shape, layout, torch.float64, True, True)

    def fn(x, r, w, b):
        return fused_resnet.functional.batch_norm_add_relu(x, r, rm, rv, w, b, training=training)

    assert _gradcheck(backend, fn, (x, r, w, b))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64_no_affine_1d(backend, training):
    x = make_tensor((6, 3), torch.float64).requires_grad_()
    rm, rv = torch.zeros(3, dtype=torch.float64, device=DEVICE), torch.ones(3, dtype=torch.float64, device=DEVICE)

    def fn(x):
        return fused_resnet.functional.batch_norm_relu(x, rm.clone(), rv.clone(), training=training)

    assert _gradcheck(backend, fn, (x,))


@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (2, 5, 2, 4, 3)])
def test_channels_last_is_kept(backend, shape):
    x, r, w, b, rm, rv = _op_args(shape, "channels_last", torch.float32, True, True)
    for training in (True, False):
        y = fused_resnet.functional.batch_norm_add_relu(x, r, rm, rv, w, b, training=training)
        assert memory_format_of(y) == memory_format_of(x)
        y.backward(make_tensor(shape, torch.float32, "channels_last"))
        assert memory_format_of(x.grad) == memory_format_of(x)
        assert memory_format_of(r.grad) == memory_format_of(x)
        x.grad = r.grad = None


def test_expanded_grad_out(backend):
    """A stride-0 gradient (from .sum()/.mean()) is a legal upstream gradient."""
    x = make_tensor((3, 4, 5), torch.float64).requires_grad_()
    y = fused_resnet.functional.batch_norm_relu(x, None, None, training=True)
    y.mean().backward()
    x_ref = x.detach().clone().requires_grad_()
    torch.relu(torch.nn.functional.batch_norm(x_ref, None, None, training=True)).mean().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_deterministic(backend, training):
    x, r, w, b, rm, rv = _op_args((4, 3, 17, 19), "channels_last", torch.float32, True, True)
    grad_out = make_tensor(x.shape, torch.float32)
    results = []
    for _ in range(2):
        y = fused_resnet.functional.batch_norm_add_relu(x, r, rm.clone(), rv.clone(), w, b, training=training)
        grads = torch.autograd.grad(y, (x, r, w, b), grad_out)
        results.append((y,) + grads)
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_outputs_are_poisoned():
    """The autouse fixture really fills fresh allocations with NaN (an unwritten element shows)."""
    assert torch.empty(64, device=DEVICE).isnan().all()
    assert torch.empty_like(torch.ones(3, 4, 5, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)).isnan().all()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward_is_a_clear_error(backend, training):
    x = make_tensor((3, 4, 5), torch.float64).requires_grad_()
    rm, rv = torch.zeros(4, dtype=torch.float64, device=DEVICE), torch.ones(4, dtype=torch.float64, device=DEVICE)
    y = fused_resnet.functional.batch_norm_relu(x, rm, rv, training=training)
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    if backend == "reference":  # eager ops: double backward works and matches eager
        x_ref = x.detach().clone().requires_grad_()
        y_ref = torch.relu(torch.nn.functional.batch_norm(x_ref, rm, rv, training=training))
        (grad_ref,) = torch.autograd.grad(y_ref.square().sum(), x_ref, create_graph=True)
        torch.testing.assert_close(torch.autograd.grad(grad_x.sum(), x)[0], torch.autograd.grad(grad_ref.sum(), x_ref)[0])
    else:
        with pytest.raises(NotImplementedError, match="double backward"):
            grad_x.sum().backward()
