"""One op contract (fused_resnet/contract.py, csrc/common/contract.cpp): every backend has the same
ops with the same schemas, accepts the same calls, and refuses the same bad calls with the same
error type and message, before anything changes."""

import pytest
import torch

import fused_resnet
from fused_resnet import contract
from fused_resnet.backend import _registry
from helpers import BACKENDS, DEVICE, make_tensor

OP_NAMES = contract.OP_NAMES
EPS = 1e-5


def _ops(backend_name):
    return _registry[backend_name].ops


def _schema_namespaces():
    """The op namespaces whose schemas can be compared (the reference backend's ops are plain
    Python functions)."""
    names = []
    if fused_resnet.EXTENSION_ERROR is None:
        names.append("fused_resnet")
    if hasattr(torch.ops, "fused_resnet_triton") and "triton" in fused_resnet.available_backends():
        names.append("fused_resnet_triton")
    return names


def _arguments(schema):
    """(name, type, written to) of each argument."""
    return [(a.name, str(a.type), bool(a.alias_info and a.alias_info.is_write)) for a in schema.arguments]


@pytest.mark.skipif(len(_schema_namespaces()) < 2, reason="needs both the C++ and the Triton ops")
@pytest.mark.parametrize("op", OP_NAMES)
def test_every_backend_has_the_same_schema(op):
    schemas = [getattr(getattr(torch.ops, ns), contract.schema_name(op)).default._schema for ns in _schema_namespaces()]
    assert all(_arguments(s) == _arguments(schemas[0]) for s in schemas), schemas
    returns = [[str(r.type) for r in s.returns] for s in schemas]
    assert all(r == returns[0] for r in returns), schemas


def test_every_backend_lists_every_op():
    for name in BACKENDS:
        ops = _ops(name)
        assert ops._fields == OP_NAMES and all(callable(op) for op in ops), name


# ---------------------------------------------------------------------------------------------
# Calls: each builds its arguments afresh (float32 CPU or CUDA tensors of shape (2, 3, 4, 5)).

C = 3
SHAPE = (2, C, 4, 5)


# The device the arguments are made on, as the error messages name it: cuda:0 for DEVICE cuda.
ARG_DEVICE = torch.empty(0, device=DEVICE).device


def _x(dtype=torch.float32, shape=SHAPE):
    return make_tensor(shape, dtype)


def _vec(dtype=torch.float32, n=C, device=DEVICE):
    return (torch.rand(n, dtype=dtype, device=device) + 0.5)


def _bn_act(x=None, r=None, w=None, b=None, rm=None, rv=None, training=True, eps=EPS):
    return (x if x is not None else _x(), r, w, b, rm, rv, training, 0.1, eps)


def _bwd(dy=None, y=None, mask=None, x=None, w=None, mean=None, invstd=None):
    return (
        dy if dy is not None else _x(), y if y is not None else _x(),
        mask if mask is not None else torch.empty(0, dtype=torch.uint8, device=DEVICE),
        x if x is not None else _x(), w, mean if mean is not None else _vec(),
        invstd if invstd is not None else _vec(), True, False,
    )


def _reduce(dy=None, mean=None):
    return (dy if dy is not None else _x(), _x(), _x(), mean if mean is not None else _vec(), _vec())


def _apply(w=None, mean_dz_xhat=None):
    m = mean_dz_xhat if mean_dz_xhat is not None else _vec()
    return (_x(), _x(), _x(), w, _vec(), _vec(), _vec(), m, True)


GOOD_CALLS = {
    "bn_act train": ("bn_act", lambda: _bn_act(r=_x(), w=_vec(), b=_vec(), rm=_vec(), rv=_vec())),
    "bn_act eval": ("bn_act", lambda: _bn_act(w=_vec(), rm=_vec(), rv=_vec(), training=False)),
    "bn_act untracked": ("bn_act", lambda: _bn_act()),
    "bn_act half, float params": ("bn_act", lambda: _bn_act(x=_x(torch.float16), w=_vec(), rm=_vec(), rv=_vec())),
    "bn_act_fwd_train": ("bn_act_fwd_train", lambda: (_x(), _x(), _vec(), None, EPS)),
    "bn_act_fwd_eval": ("bn_act_fwd_eval", lambda: (_x(), None, _vec(), _vec(), _vec(), _vec(), EPS)),
    # eps 0 with the running statistics (AddReLU's identity statistics), as F.batch_norm takes it
    "bn_act eval, eps 0": ("bn_act", lambda: _bn_act(rm=_vec(), rv=_vec(), training=False, eps=0.0)),
    "bn_act_fwd_eval eps 0": ("bn_act_fwd_eval", lambda: (_x(), None, _vec(), _vec(), None, None, 0.0)),
    "bn_act_bwd": ("bn_act_bwd", lambda: _bwd(w=_vec())),
    "bn_stats": ("bn_stats", lambda: (_x(),)),
    "bn_act_bwd_reduce": ("bn_act_bwd_reduce", lambda: _reduce()),
    "bn_act_bwd_apply": ("bn_act_bwd_apply", lambda: _apply(w=_vec())),
    "bn_act silu": ("bn_act", lambda: _bn_act(r=_x(), w=_vec(), b=_vec()) + ("silu", 0.01)),
    "bn_act_fwd_eval leaky_relu, slope 0": (
        "bn_act_fwd_eval", lambda: (_x(), None, _vec(), _vec(), _vec(), _vec(), EPS, "leaky_relu", 0.0)),
    # the smooth activations' backward recomputes z: no out, the residual and bias instead
    "bn_act_bwd gelu without out": (
        "bn_act_bwd", lambda: (_x(), None) + _bwd(w=_vec())[2:] + (_x(), _vec(), "gelu", 0.01)),
    "bn_act_bwd_reduce hardswish without out": (
        "bn_act_bwd_reduce", lambda: (_x(), None, _x(), _vec(), _vec(), None, _vec(), None, "hardswish", 0.01)),
    "bn_act_bwd_apply identity without out": (
        "bn_act_bwd_apply", lambda: (_x(), None) + _apply(w=_vec())[2:] + (None, None, "identity", 0.01)),
}

# name: (op, arguments, error type, the message without the op's name)
BAD_CALLS = {
    "integer input": ("bn_act", lambda: _bn_act(x=torch.ones(SHAPE, dtype=torch.int64, device=DEVICE)),
                      TypeError, "expected a floating-point input (float16, bfloat16, float32 or float64), got torch.int64"),
    "1-D input": ("bn_act", lambda: _bn_act(x=_x(shape=(5,))), ValueError,
                  "expected an input of at least 2 dimensions (N, C, ...), got 1D input of shape (5,)"),
    "residual shape": ("bn_act", lambda: _bn_act(r=_x(shape=(2, C, 4, 1))), ValueError,
                       "residual shape (2, 3, 4, 1) does not match input shape (2, 3, 4, 5)"),
    "residual dtype": ("bn_act", lambda: _bn_act(r=_x(torch.float64)), TypeError,
                       "residual dtype torch.float64 does not match input dtype torch.float32"),
    "residual device": ("bn_act", lambda: _bn_act(r=torch.empty(SHAPE, device="meta")), RuntimeError,
                        f"expected all tensors on {ARG_DEVICE}, but residual is on meta"),
    "weight shape": ("bn_act", lambda: _bn_act(w=_vec(n=4)), ValueError,
                     "weight should hold one value per channel, shape (3,) for input of shape (2, 3, 4, 5), got shape (4,)"),
    "float64 weight, float32 input": ("bn_act", lambda: _bn_act(w=_vec(torch.float64)), TypeError,
                                      "weight dtype torch.float64 is not supported with a torch.float32 input (expected torch.float32)"),
    "float32 weight, float64 input": ("bn_act", lambda: _bn_act(x=_x(torch.float64), w=_vec()), TypeError,
                                      "weight dtype torch.float32 is not supported with a torch.float64 input (expected torch.float64)"),
    "float64 bias, float16 input": ("bn_act", lambda: _bn_act(x=_x(torch.float16), b=_vec(torch.float64)), TypeError,
                                    "bias dtype torch.float64 is not supported with a torch.float16 input (expected torch.float16 or torch.float32)"),
    "running_var shape": ("bn_act", lambda: _bn_act(rm=_vec(), rv=_vec()[:2]), ValueError,
                          "running_var should hold one value per channel, shape (3,) for input of shape (2, 3, 4, 5), got shape (2,)"),
    "running_mean alone": ("bn_act", lambda: _bn_act(rm=_vec()), ValueError, "running_mean and running_var must be given together"),
    "eval without running statistics": ("bn_act", lambda: _bn_act(training=False), ValueError,
                                        "running_mean and running_var are required when training=False (eval mode normalizes with the running statistics)"),
    "one value per channel": ("bn_act", lambda: _bn_act(x=_x(shape=(1, C, 1, 1)), rm=_vec(), rv=_vec()), ValueError,
                              "Expected more than 1 value per channel when training, got input size torch.Size([1, 3, 1, 1])"),
    # F.batch_norm refuses these too (ValueError): batch statistics need eps > 0, running ones eps >= 0
    "training, eps 0": ("bn_act", lambda: _bn_act(rm=_vec(), rv=_vec(), eps=0.0), ValueError,
                        "eps must be positive when normalizing with batch statistics, got 0"),
    "fwd_train negative eps": ("bn_act_fwd_train", lambda: (_x(), None, None, None, -1e-5), ValueError,
                               "eps must be positive when normalizing with batch statistics, got -1e-05"),
    "eval, negative eps": ("bn_act", lambda: _bn_act(rm=_vec(), rv=_vec(), training=False, eps=-0.5), ValueError,
                           "eps must be non-negative, got -0.5"),
    "fwd_eval NaN eps": ("bn_act_fwd_eval", lambda: (_x(), None, _vec(), _vec(), None, None, float("nan")), ValueError,
                         "eps must be non-negative, got nan"),
    "fwd_train bias dtype": ("bn_act_fwd_train", lambda: (_x(), None, None, _vec(torch.float64), EPS), TypeError,
                             "bias dtype torch.float64 is not supported with a torch.float32 input (expected torch.float32)"),
    "fwd_eval running_var shape": ("bn_act_fwd_eval", lambda: (_x(), None, _vec(), _vec(n=1), None, None, EPS), ValueError,
                                   "running_var should hold one value per channel, shape (3,) for input of shape (2, 3, 4, 5), got shape (1,)"),
    "fwd_eval weight device": ("bn_act_fwd_eval", lambda: (_x(), None, _vec(), _vec(), _vec(device="meta"), None, EPS),
                               RuntimeError, f"expected all tensors on {ARG_DEVICE}, but weight is on meta"),
    "bwd grad_out shape": ("bn_act_bwd", lambda: _bwd(dy=_x(shape=(2, C, 4, 4))), ValueError,
                           "grad_out shape (2, 3, 4, 4) does not match input shape (2, 3, 4, 5)"),
    "bwd out dtype": ("bn_act_bwd", lambda: _bwd(y=_x(torch.float16)), TypeError,
                      "out dtype torch.float16 does not match input dtype torch.float32"),
    "bwd act_mask dtype": ("bn_act_bwd", lambda: _bwd(mask=torch.zeros(4, device=DEVICE)), TypeError,
                            "act_mask should be a 1-D torch.uint8 tensor, got torch.float32 of shape (4,)"),
    # the planes layout (contiguous NCHW): no backend keeps a mask for it
    "bwd act_mask size": ("bn_act_bwd", lambda: _bwd(mask=torch.zeros(15, dtype=torch.uint8, device=DEVICE)), ValueError,
                           "act_mask holds 15 bytes; expected none (this backend's bn_act_fwd_train keeps no mask for this input)"),
    "bwd invstd shape": ("bn_act_bwd", lambda: _bwd(invstd=_vec(n=2)), ValueError,
                         "invstd should hold one value per channel, shape (3,) for input of shape (2, 3, 4, 5), got shape (2,)"),
    "stats bool input": ("bn_stats", lambda: (torch.ones(SHAPE, dtype=torch.bool, device=DEVICE),), TypeError,
                         "expected a floating-point input (float16, bfloat16, float32 or float64), got torch.bool"),
    "bwd_reduce grad_out dtype": ("bn_act_bwd_reduce", lambda: _reduce(dy=_x(torch.float64)), TypeError,
                                  "grad_out dtype torch.float64 does not match input dtype torch.float32"),
    "bwd_reduce mean shape": ("bn_act_bwd_reduce", lambda: _reduce(mean=_vec(n=5)), ValueError,
                              "mean should hold one value per channel, shape (3,) for input of shape (2, 3, 4, 5), got shape (5,)"),
    "bwd_apply mean_dz_xhat shape": ("bn_act_bwd_apply", lambda: _apply(mean_dz_xhat=_vec(n=2)), ValueError,
                                     "mean_dz_xhat should hold one value per channel, shape (3,) for input of shape (2, 3, 4, 5), got shape (2,)"),
    "bwd_apply weight dtype": ("bn_act_bwd_apply", lambda: _apply(w=_vec(torch.float16)), TypeError,
                               "weight dtype torch.float16 is not supported with a torch.float32 input (expected torch.float32)"),
    "unknown activation": ("bn_act", lambda: _bn_act() + ("elu", 0.01), ValueError,
                           "unknown activation 'elu'; expected one of relu, relu6, leaky_relu, identity, silu, hardswish, "
                           "gelu, gelu_tanh"),
    "leaky_relu negative slope": ("bn_act_fwd_train", lambda: (_x(), None, None, None, EPS, "leaky_relu", -0.5), ValueError,
                                  "leaky_relu's negative_slope must be >= 0 for the fused op (got -0.5): the backward "
                                  "tells the side of the kink from the output's sign"),
    "bwd relu6 without out": ("bn_act_bwd", lambda: (_x(), None) + _bwd()[2:] + (None, None, "relu6", 0.01), ValueError,
                              "out is required for the backward of relu6"),
    "bwd_reduce silu residual shape": (
        "bn_act_bwd_reduce", lambda: (_x(), None, _x(), _vec(), _vec(), _x(shape=(2, C, 5, 4)), None, None, "silu", 0.01),
        ValueError, "residual shape (2, 3, 5, 4) does not match input shape (2, 3, 4, 5)"),
    "bwd_apply unknown activation": ("bn_act_bwd_apply", lambda: _apply() + (None, None, "swish", 0.01), ValueError,
                                     "unknown activation 'swish'; expected one of relu, relu6, leaky_relu, identity, "
                                     "silu, hardswish, gelu, gelu_tanh"),
}


@pytest.mark.parametrize("case", list(GOOD_CALLS))
def test_every_backend_accepts_the_same_calls(case):
    op, make_args = GOOD_CALLS[case]
    for name in BACKENDS:
        getattr(_ops(name), op)(*make_args())


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_every_backend_refuses_the_same_calls_alike(case):
    op, make_args, error, message = BAD_CALLS[case]
    prefix = "" if message.startswith("Expected more than 1") else f"{op}: "  # torch's own text
    for name in BACKENDS:
        args = make_args()
        before = [a.clone() for a in args if isinstance(a, torch.Tensor) and a.device.type != "meta"]
        with pytest.raises(Exception) as info:
            getattr(_ops(name), op)(*args)
        assert (type(info.value), str(info.value)) == (error, prefix + message), name
        after = [a for a in args if isinstance(a, torch.Tensor) and a.device.type != "meta"]
        assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(after, before)), f"{name} changed an argument"


def test_the_cases_cover_every_op():
    assert {op for op, *_ in BAD_CALLS.values()} == set(OP_NAMES)
    assert {op for op, _ in GOOD_CALLS.values()} == set(OP_NAMES)
