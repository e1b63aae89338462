"""torch.library.opcheck of every op of every op set (the C++ ops on the test device, the Triton
ops): schema, fake impl, autograd registration and, where kernels can run on traced tensors, AOT
dispatch, on samples of every layout and dtype, with and without the optional arguments."""

import pytest
import torch

from fused_resnet.backend import _registry
from helpers import OP_BACKENDS, TRITON_INTERPRETED, channel_params, channel_stats, make_tensor, param_dtype_for

SAMPLES = [
    # (shape, layout, dtype, residual)
    ((4, 3), "contiguous", torch.float32, False),
    ((3, 5, 7), "sliced", torch.float32, True),
    ((2, 3, 5, 4), "contiguous", torch.float64, True),
    ((2, 3, 5, 4), "channels_last", torch.float32, True),
    ((2, 6, 3, 3, 5), "channels_last", torch.bfloat16, False),
    ((2, 3, 2, 3, 4), "contiguous", torch.float16, True),
    ((0, 3, 2, 2), "contiguous", torch.float32, True),
]
SAMPLE_IDS = [f"{s}-{l}-{str(d)[6:]}-{'add' if r else 'relu'}" for s, l, d, r in SAMPLES]
ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# test_aot_dispatch_dynamic runs an op's kernels on traced tensors, which the Triton interpreter
# cannot launch kernels on; the fake-tensor part runs the registered fake impls.
INTERPRETED_UTILS = ALL_UTILS[:3]


def op_calls(ops, sample, requires_grad):
    """(op, arguments) for every op of `ops` on `sample`: bn_act in training (tracked and not) and
    eval, both functional forwards, the backward of both (with the op set's own act_mask and with
    none, with and without grad_residual), and SyncBatchNorm's three pieces."""
    shape, layout, dtype, residual = sample
    x = make_tensor(shape, dtype, layout).requires_grad_(requires_grad)
    r = make_tensor(shape, dtype, layout).requires_grad_(requires_grad) if residual else None
    w, b, rm, rv = channel_params(shape[1], param_dtype_for(dtype), requires_grad)
    calls = [(ops.bn_act, (x, r, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5)) for training in (True, False)]
    calls.append((ops.bn_act, (x, r, w, b, None, None, True, 0.1, 1e-5)))
    calls.append((ops.bn_act_fwd_train, (x, r, w, b, 1e-5)))
    with torch.no_grad():
        out, mean, invstd, _, act_mask = ops.bn_act_fwd_train(x, r, w, b, 1e-5)
    # The internal ops no module differentiates through have no autograd: called on plain tensors.
    xd, wd, grad_out = x.detach(), w.detach(), make_tensor(shape, dtype)
    rd = r.detach() if residual else None
    calls.append((ops.bn_act_fwd_eval, (xd, rd, rm, rv, wd, b.detach(), 1e-5)))
    for mask in {act_mask.numel(): act_mask, 0: act_mask.new_empty((0,))}.values():
        for batch_stats in (True, False):
            for residual_grad in (True, False):
                args = (grad_out, out, mask, xd, wd, mean, invstd, batch_stats, residual_grad)
                calls.append((ops.bn_act_bwd, args))
    calls.append((ops.bn_stats, (xd,)))
    calls.append((ops.bn_act_bwd_reduce, (grad_out, out, xd, mean, invstd)))
    mean_dz, mean_dz_xhat = channel_stats(shape[1], dtype)
    for weight in (wd, None):
        calls.append((ops.bn_act_bwd_apply, (grad_out, out, xd, weight, mean, invstd, mean_dz, mean_dz_xhat, residual)))
    # Another activation through every op: one the backward reads out for (leaky_relu), one whose
    # backward recomputes z (silu: no out; the residual and bias instead).
    bd = b.detach()
    calls.append((ops.bn_act, (x, r, w, b, rm.clone(), rv.clone(), True, 0.1, 1e-5, "silu", 0.01)))
    calls.append((ops.bn_act, (x, r, w, b, rm.clone(), rv.clone(), False, 0.1, 1e-5, "leaky_relu", 0.2)))
    calls.append((ops.bn_act_fwd_train, (x, r, w, b, 1e-5, "silu", 0.01)))
    calls.append((ops.bn_act_fwd_eval, (xd, rd, rm, rv, wd, bd, 1e-5, "gelu_tanh", 0.01)))
    with torch.no_grad():
        out_leaky, _, _, _, mask_leaky = ops.bn_act_fwd_train(xd, rd, wd, bd, 1e-5, "leaky_relu", 0.2)
    calls.append((ops.bn_act_bwd, (grad_out, out_leaky, mask_leaky, xd, wd, mean, invstd, True, residual, rd, bd,
                                   "leaky_relu", 0.2)))
    calls.append((ops.bn_act_bwd, (grad_out, None, mask_leaky.new_empty((0,)), xd, wd, mean, invstd, False, residual,
                                   rd, bd, "silu", 0.01)))
    calls.append((ops.bn_act_bwd_reduce, (grad_out, None, xd, mean, invstd, rd, wd, bd, "hardswish", 0.01)))
    calls.append((ops.bn_act_bwd_apply, (grad_out, None, xd, wd, mean, invstd, mean_dz, mean_dz_xhat, residual, rd, bd,
                                         "gelu", 0.01)))
    return calls


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("sample", SAMPLES, ids=SAMPLE_IDS)
@pytest.mark.parametrize("backend_name", OP_BACKENDS)
def test_opcheck(backend_name, sample, requires_grad):
    utils = INTERPRETED_UTILS if backend_name == "triton" and TRITON_INTERPRETED else ALL_UTILS
    calls = op_calls(_registry[backend_name].ops, sample, requires_grad)
    assert {op for op, _ in calls} == set(_registry[backend_name].ops)  # every op
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=utils)
