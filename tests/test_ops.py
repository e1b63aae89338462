"""The ops themselves: gradcheck, layouts, determinism, the CPU ReLU mask, and the poisoning the
whole suite relies on (opcheck of every op set: test_opcheck.py)."""

import pytest
import torch

import fused_resnet
from fused_resnet.contract import op_set_of
from helpers import BACKENDS, DEVICE, TRITON_INTERPRETED, channel_params, make_tensor, memory_format_of, param_dtype_for

COMPILED = [b for b in BACKENDS if b != "reference"]
cxx_ops = op_set_of(torch.ops.fused_resnet) if fused_resnet.EXTENSION_ERROR is None else None


def _gradcheck(backend, fn, inputs):
    # On the Triton interpreter the full numerical Jacobian (two forwards per input element)
    # takes minutes; gradcheck's fast mode checks random projections of it instead.
    fast_mode = backend == "triton" and TRITON_INTERPRETED
    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast_mode)

def _op_args(shape, layout, dtype, residual, requires_grad):
    x = make_tensor(shape, dtype, layout).requires_grad_(requires_grad)
    r = make_tensor(shape, dtype, layout).requires_grad_(requires_grad) if residual else None
    return (x, r) + channel_params(shape[1], param_dtype_for(dtype), requires_grad)


@pytest.mark.skipif(not COMPILED, reason="no compiled backend (fused_resnet._C not built)")
def test_ops_do_not_mutate_inputs():
    x, r, w, b, rm, rv = _op_args((3, 4, 5, 5), "channels_last", torch.float32, True, False)
    before = [t.clone() for t in (x, r, w, b, rm, rv)]
    cxx_ops.bn_act_fwd_train(x, r, w, b, 1e-5)
    cxx_ops.bn_act_fwd_eval(x, r, rm, rv, w, b, 1e-5)
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


# ---------------------------------------------------------------------------------------------
# The CPU kernels' act_mask (csrc/fused_resnet.cpp): bit e % 8 of byte e / 8 set where out[e] <= 0
# (e in memory order) for rows-layout inputs whose rows fill whole vectors; bn_act_bwd reads it
# instead of out.

CPU_COMPILED = "cpu" in fused_resnet.available_backends(torch.device("cpu"))
cpu_only = pytest.mark.skipif(not CPU_COMPILED, reason="the C++ CPU backend is not built")


def _memory_order(t):
    """The elements of a dense tensor (storage offset 0) as they lie in memory."""
    return t.as_strided((t.numel(),), (1,))


def _expected_mask(out):
    off = (_memory_order(out).float() <= 0).to(torch.uint8)
    off = torch.nn.functional.pad(off, (0, (-off.numel()) % 8)).reshape(-1, 8)
    return (off << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def _cpu_keeps_mask():
    """Whether this build keeps masks at all (it needs AVX2): probed on a case that always has one."""
    x = torch.randn(2, 64, 3, 3).contiguous(memory_format=torch.channels_last)
    return bool(cxx_ops.bn_act_fwd_train(x, None, None, None, 1e-5)[4].any())


def _rows_fill_vectors(channels, dtype):
    # csrc/cpu/plans.h, plan_row_period: super-rows of lcm(C, step) elements, step = one vector of T
    # (8 float lanes, 16 for Half/BFloat16), up to 4096 elements
    import math

    step = 8 if dtype == torch.float32 else 16
    return math.lcm(channels, step) <= 4096


MASK_CASES = [
    # (shape, layout), all in the rows layout: C = 1, 3, 19 (super-rows with leftover rows), 64,
    # 520; 517 rows cannot fill whole vectors (lcm(517, 8) > 4096)
    ((2, 3, 5, 5), "channels_last"),
    ((3, 19, 7, 5), "channels_last"),
    ((2, 64, 6, 7), "channels_last"),
    ((13, 1), "contiguous"),
    ((2, 5, 3, 2, 7), "channels_last"),
    ((37, 19), "contiguous"),
    ((9, 520), "contiguous"),
    ((3, 517, 1, 1), "contiguous"),
]


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", MASK_CASES, ids=[f"{'x'.join(map(str, s))}-{l}" for s, l in MASK_CASES])
def test_cpu_act_mask_bits(case, dtype):
    shape, layout = case
    x = make_tensor(shape, dtype, layout, device="cpu")
    r = make_tensor(shape, dtype, layout, device="cpu")
    out, _, _, _, mask = cxx_ops.bn_act_fwd_train(x, r, None, None, 1e-5)
    assert mask.dtype == torch.uint8 and mask.shape == ((x.numel() + 7) // 8,)
    assert fused_resnet.ops.cpu_act_mask_bytes(x) == mask.numel()
    keeps = dtype != torch.float64 and _rows_fill_vectors(shape[1], dtype) and _cpu_keeps_mask()
    if keeps:
        assert torch.equal(mask, _expected_mask(out))
    else:
        assert not mask.any()


@cpu_only
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (2, 3, 2, 3, 4), (4, 6, 5)])
def test_cpu_act_mask_empty_for_planes(shape):
    x = make_tensor(shape, torch.float32, device="cpu")
    mask = cxx_ops.bn_act_fwd_train(x, None, None, None, 1e-5)[4]
    assert mask.numel() == 0 == fused_resnet.ops.cpu_act_mask_bytes(x)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual_grad", [True, False], ids=["dr", "no-dr"])
@pytest.mark.parametrize("case", MASK_CASES[:6], ids=[f"{'x'.join(map(str, s))}-{l}" for s, l in MASK_CASES[:6]])
def test_cpu_bwd_with_act_mask_equals_bwd_from_out(case, dtype, residual_grad):
    """The saved bits give exactly the results of the mask taken from out (same sums, same
    order), ties (out == 0, plenty after the ReLU) and a NaN channel included."""
    shape, layout = case
    x = make_tensor(shape, dtype, layout, device="cpu")
    x[:, 0] = float("nan")
    w = torch.rand(shape[1]) + 0.5
    b = torch.randn(shape[1])
    out, mean, invstd, _, mask = cxx_ops.bn_act_fwd_train(x, None, w, b, 1e-5)
    grad_out = make_tensor(shape, dtype, layout, device="cpu")
    with_mask = cxx_ops.bn_act_bwd(grad_out, out, mask, x, w, mean, invstd, True, residual_grad)
    from_out = cxx_ops.bn_act_bwd(grad_out, out, mask.new_empty((0,)), x, w, mean, invstd, True, residual_grad)
    for mine, theirs in zip(with_mask, from_out):
        assert torch.equal(mine.nan_to_num(7.0), theirs.nan_to_num(7.0))
    assert with_mask[0][:, 1:].isfinite().all()  # the NaN stays in its channel


@cpu_only
def test_cpu_bwd_rejects_a_wrong_act_mask():
    x = make_tensor((2, 8, 3, 3), torch.float32, "channels_last", device="cpu")
    out, mean, invstd, _, mask = cxx_ops.bn_act_fwd_train(x, None, None, None, 1e-5)
    args = (x, None, mean, invstd, True, False)
    with pytest.raises(ValueError, match=r"act_mask holds 8 bytes; expected none or 18"):
        cxx_ops.bn_act_bwd(x, out, mask[:8], *args)
    with pytest.raises(TypeError, match="act_mask should be a 1-D torch.uint8 tensor"):
        cxx_ops.bn_act_bwd(x, out, mask.float(), *args)
    planes = x.contiguous()
    with pytest.raises(ValueError, match="act_mask holds 18 bytes; expected none"):
        cxx_ops.bn_act_bwd(planes, out.contiguous(), mask, planes, None, mean, invstd, True, False)
