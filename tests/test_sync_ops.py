"""The SyncBatchNorm pieces of every backend: bn_stats, bn_act_bwd_reduce, bn_act_bwd_apply.

Each op is compared with its formula evaluated in float64 on the same (rounded) inputs, over
every layout, odd sizes, reduced precision and empty batches (their torch.library.opcheck is
test_opcheck.py's, with every other op). Composed with a single process's statistics, the pieces
reproduce the training ops.
"""

import pytest
import torch

import fused_resnet
from helpers import DEVICE, acc_dtype, assert_close, channel_stats, layouts_for, make_tensor, memory_format_of, param_dtype_for

SHAPES = [
    (7, 3),  # (N, C): rows layout with S == 1
    (5, 19, 7),
    (2, 3, 5, 7),
    (3, 19, 7, 9),  # C not a multiple of the vector width: leftover rows in channels_last
    (2, 6, 3, 3, 5),
    (4, 5, 91, 97),  # few channels, many values: reductions split over threads (2 or more)
]
SHAPE_LAYOUTS = [(s, l) for s in SHAPES for l in layouts_for(s)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _layout_dtype_cases():
    """(shape, layout, dtype); under the Triton interpreter the largest shape (the split
    reduction, seconds a case there) in float32 only: the other dtypes take the same split."""
    split_in_float32 = pytest.mark.triton_interpreter(
        reason="the split-reduction shape in float32 only under the Triton interpreter (a GPU run covers the rest)",
        skip=True,
    )
    return [
        pytest.param(
            shape, layout, dtype, id=f"{shape}-{layout}-{str(dtype)[6:]}",
            marks=split_in_float32 if shape == SHAPES[-1] and dtype != torch.float32 else (),
        )
        for shape, layout in SHAPE_LAYOUTS
        for dtype in DTYPES
    ]


def _per_channel(t, ndim):
    return t.double().reshape((1, -1) + (1,) * (ndim - 2))


def _reduce_dims(x):
    return [0] + list(range(2, x.dim()))


def _impl():
    return fused_resnet.backend.resolve(DEVICE).ops


def _dz_x_hat64(grad_out, out, x, mean, invstd):
    dz = torch.where(out <= 0, torch.zeros_like(grad_out), grad_out).double()
    x_hat = (x.double() - _per_channel(mean, x.dim())) * _per_channel(invstd, x.dim())
    return dz, x_hat


@pytest.mark.parametrize("shape,layout,dtype", _layout_dtype_cases())
def test_stats_match_float64(backend, shape, layout, dtype):
    x = make_tensor(shape, dtype, layout, scale=2.0, offset=3.0)
    mean, var = _impl().bn_stats(x)
    assert mean.dtype == var.dtype == acc_dtype(dtype) and mean.shape == var.shape == (shape[1],)
    ref_var, ref_mean = torch.var_mean(x.double(), dim=_reduce_dims(x), correction=0)
    assert_close(mean, ref_mean, dtype, "mean")
    assert_close(var, ref_var, dtype, "var")


@pytest.mark.parametrize("shape,layout,dtype", _layout_dtype_cases())
def test_bwd_reduce_matches_float64(backend, shape, layout, dtype):
    x = make_tensor(shape, dtype, layout)
    out = make_tensor(shape, dtype, layout)  # about half <= 0: the ReLU mask is exercised
    grad_out = make_tensor(shape, dtype, layout)
    mean, invstd = channel_stats(shape[1], dtype)
    sum_dz_xhat, sum_dz = _impl().bn_act_bwd_reduce(grad_out, out, x, mean, invstd)
    assert sum_dz_xhat.dtype == sum_dz.dtype == acc_dtype(dtype)
    dz, x_hat = _dz_x_hat64(grad_out, out, x, mean, invstd)
    dims = _reduce_dims(x)
    assert_close(sum_dz, dz.sum(dims), dtype, "sum_dz")
    assert_close(sum_dz_xhat, (dz * x_hat).sum(dims), dtype, "sum_dz_xhat")


@pytest.mark.parametrize("residual_grad,affine", [(True, True), (False, False)], ids=["dr-affine", "no_dr-no_affine"])
@pytest.mark.parametrize("shape,layout,dtype", _layout_dtype_cases())
def test_bwd_apply_matches_float64(backend, shape, layout, dtype, residual_grad, affine):
    channels = shape[1]
    x = make_tensor(shape, dtype, layout)
    out = make_tensor(shape, dtype, layout)
    grad_out = make_tensor(shape, dtype, layout)
    mean, invstd = channel_stats(channels, dtype)
    weight = torch.randn(channels, dtype=param_dtype_for(dtype), device=DEVICE) if affine else None
    mean_dz = torch.randn(channels, dtype=acc_dtype(dtype), device=DEVICE) * 0.1
    mean_dz_xhat = torch.randn(channels, dtype=acc_dtype(dtype), device=DEVICE) * 0.1
    grad_input, grad_residual = _impl().bn_act_bwd_apply(
        grad_out, out, x, weight, mean, invstd, mean_dz, mean_dz_xhat, residual_grad
    )

    dz, x_hat = _dz_x_hat64(grad_out, out, x, mean, invstd)
    scale = invstd.double() if weight is None else invstd.double() * weight.double()
    ndim = x.dim()
    ref = (dz - _per_channel(mean_dz, ndim) - x_hat * _per_channel(mean_dz_xhat, ndim)) * _per_channel(scale, ndim)
    assert grad_input.dtype == dtype and grad_input.shape == x.shape
    assert memory_format_of(grad_input) == memory_format_of(x)
    assert_close(grad_input, ref, dtype, "grad_input")
    if residual_grad:
        assert grad_residual.dtype == dtype and memory_format_of(grad_residual) == memory_format_of(x)
        assert_close(grad_residual, dz, dtype, "grad_residual")
    else:
        assert grad_residual.numel() == 0


def _pieces_cases():
    """(shape, layout, residual); under the Triton interpreter the largest shape (35k values per
    channel, a minute a case there) composes the split pieces in one case, and
    test_*_matches_float64 check each split piece in every layout."""
    one_split_case = pytest.mark.triton_interpreter(
        reason="one split-reduction case under the Triton interpreter (a GPU run covers the rest)", skip=True
    )
    return [
        pytest.param(
            shape, layout, residual, id=f"{shape}-{layout}-{'add_relu' if residual else 'relu'}",
            marks=one_split_case if shape == SHAPES[-1] and (layout, residual) != ("channels_last", False) else (),
        )
        for shape, layout in SHAPE_LAYOUTS
        for residual in (False, True)
    ]


@pytest.mark.parametrize("shape,layout,residual", _pieces_cases())
def test_pieces_compose_to_the_training_ops(backend, shape, layout, residual):
    """One process's statistics through the pieces: stats -> eval apply -> reduce -> apply with
    the means of the sums gives the training forward and backward."""
    dtype, channels = torch.float32, shape[1]
    impl = _impl()
    x = make_tensor(shape, dtype, layout)
    r = make_tensor(shape, dtype, layout) if residual else None
    w = torch.rand(channels, dtype=dtype, device=DEVICE) + 0.5
    b = torch.randn(channels, dtype=dtype, device=DEVICE)
    grad_out = make_tensor(shape, dtype, layout)
    count = x.numel() // channels

    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) + ((r,) if residual else ())]
    x_t, w_t, b_t = leaves[:3]
    out_t, mean_t, invstd_t, var_t, _act_mask = impl.bn_act_fwd_train(x_t, leaves[3] if residual else None, w_t, b_t, 1e-5)
    gx_t, gw_t, gb_t, *gr_t = torch.autograd.grad(out_t, leaves, grad_out)

    mean, var = impl.bn_stats(x)
    out = impl.bn_act_fwd_eval(x, r, mean, var, w, b, 1e-5)
    invstd = torch.rsqrt(var.double() + 1e-5).to(var.dtype)
    sum_dz_xhat, sum_dz = impl.bn_act_bwd_reduce(grad_out, out, x, mean, invstd)
    gx, gr = impl.bn_act_bwd_apply(grad_out, out, x, w, mean, invstd, sum_dz / count, sum_dz_xhat / count, residual)

    for name, mine, ref in [
        ("mean", mean, mean_t), ("var", var, var_t), ("out", out, out_t), ("sum_dz", sum_dz, gb_t),
        ("sum_dz_xhat", sum_dz_xhat, gw_t), ("grad_input", gx, gx_t),
    ] + ([("grad_residual", gr, gr_t[0])] if residual else []):
        assert_close(mine, ref, dtype, name)
    if backend == "cpu":
        # The C++ pieces run the training ops' own statistics, apply and reduction code.
        assert torch.equal(mean, mean_t) and torch.equal(var, var_t) and torch.equal(out, out_t)
        sums = impl.bn_act_bwd_reduce(grad_out, out, x, mean, invstd_t)
        assert torch.equal(sums[0], gw_t) and torch.equal(sums[1], gb_t)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (3, 4, 0, 2), (0, 5)])
def test_empty_batch(backend, shape):
    impl = _impl()
    channels = shape[1]
    x = torch.randn(shape, device=DEVICE)
    mean, var = impl.bn_stats(x)
    zeros = torch.zeros(channels, device=DEVICE)
    assert torch.equal(mean, zeros) and torch.equal(var, zeros)
    stat_mean, invstd = channel_stats(channels, torch.float32)
    sum_dz_xhat, sum_dz = impl.bn_act_bwd_reduce(x, x, x, stat_mean, invstd)
    assert torch.equal(sum_dz_xhat, zeros) and torch.equal(sum_dz, zeros)
    w = torch.rand(channels, device=DEVICE)
    grad_input, grad_residual = impl.bn_act_bwd_apply(x, x, x, w, stat_mean, invstd, zeros, zeros, True)
    assert grad_input.shape == grad_residual.shape == shape


COMPILED = [b for b in fused_resnet.available_backends(DEVICE) if b != "reference"]


@pytest.mark.parametrize("backend_name", COMPILED)
def test_bad_arguments_are_named(backend_name):
    with fused_resnet.use_backend(backend_name):
        impl = _impl()
    x = make_tensor((2, 4, 3, 3), torch.float32)
    mean, invstd = channel_stats(4, torch.float32)
    with pytest.raises(ValueError, match=r"grad_out shape \(2, 4, 3, 1\) does not match input shape \(2, 4, 3, 3\)"):
        impl.bn_act_bwd_reduce(x[..., :1], x, x, mean, invstd)
    with pytest.raises(ValueError, match=r"mean_dz_xhat should hold one value per channel, shape \(4,\)"):
        impl.bn_act_bwd_apply(x, x, x, None, mean, invstd, mean, mean[:3], False)
    with pytest.raises(TypeError, match="expected a floating-point input"):
        impl.bn_stats(torch.ones(2, 4, dtype=torch.int64, device=DEVICE))
