"""The op contract, Python half: the list of the ops, the layout rule, and the argument checks.

Every backend implements the same seven ops (schemas and math in csrc/fused_resnet.cpp), named
once here in `OpSet`. The C++ backends check their arguments in csrc/common/contract.cpp; the
Python backends (triton, reference) and the fake impls check them here. Both halves state the
same rules, in the same order, with the same error types and messages, so a call is accepted or
refused alike whatever the backend (tests/test_contract.py holds them to it):

  input          floating dtype (TypeError), at least 2 dimensions (N, C, *) (ValueError)
  activations    (residual, grad_out, out): input's device (RuntimeError), shape (ValueError),
                 dtype (TypeError)
  per channel    (weight, bias, running statistics, mean, invstd, ...): input's device, shape
                 (C,), dtype the input's or, for a float16/bfloat16 input, float32 (the AMP case)
  bn_act         running_mean and running_var given together; required when training=False;
                 more than one value per channel when training (torch's own message)
  eps            positive where the batch statistics normalize (bn_act training, bn_act_fwd_train),
                 non-negative where the running ones do (ValueError), as F.batch_norm since torch 2.13
  act_mask      empty, or the length that backend's bn_act_fwd_train returns for that input

The input is checked first, then the other arguments in schema order, each for device, then
shape, then dtype; the first rule broken raises. Nothing is computed or changed before every
check has passed. Argument types are the schema's: an op refuses a non-Tensor through the
dispatcher's message, the reference backend (plain Python functions) with a TypeError naming the
argument (`_check_is_tensor`).
"""

import math
from typing import Any, NamedTuple

import torch

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the fused ops: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class OpSet(NamedTuple):
    """One backend's implementation of every op, by the op's name."""

    bn_act: Any  # the module op: forward + running-statistics update, with its autograd
    bn_act_fwd_train: Any
    bn_act_fwd_eval: Any
    bn_act_bwd: Any
    bn_stats: Any  # bn_stats, bn_act_bwd_reduce, bn_act_bwd_apply: SyncBatchNorm's pieces
    bn_act_bwd_reduce: Any
    bn_act_bwd_apply: Any


OP_NAMES = OpSet._fields

# The ops' names in the dispatcher (torch.ops.fused_resnet, torch.ops.fused_resnet_triton):
# bn_act, the op a module call runs, is the one user-facing op; the others are the internal
# pieces that its autograd, SyncBatchNorm and the momentum=None path compose, named with a
# leading underscore as torchvision names its backward ops (torchvision::_roi_align_backward):
# their schemas may change between releases. An op set names each op without the underscore.
PUBLIC_OPS = ("bn_act",)


def schema_name(op: str) -> str:
    """The dispatcher's name of the op set's field `op`."""
    return op if op in PUBLIC_OPS else f"_{op}"


def op_set_of(namespace) -> OpSet:
    """The op set of a torch.ops namespace (torch.ops.fused_resnet, torch.ops.fused_resnet_triton)."""
    return OpSet(*(getattr(namespace, schema_name(op)).default for op in OP_NAMES))


# ---------------------------------------------------------------------------------------------
# The layout rule: a dense NC* or channels_last input is used as it is, anything else is made
# contiguous first; outputs are allocated like that canonical input (so a channels_last input
# gives a channels_last output). The C++ twin is contract.cpp's canonical_view.


def canonical_layout(input: torch.Tensor) -> torch.Tensor:
    if input.is_contiguous():
        return input
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return input
    if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        return input
    return input.contiguous()


def is_rows_layout(input: torch.Tensor) -> bool:
    """Whether the kernels see `input` as rows [N*S][C] (channels_last, or no spatial extent)
    rather than planes [N][C][S]."""
    return math.prod(input.shape[2:]) == 1 or not canonical_layout(input).is_contiguous()


# ---------------------------------------------------------------------------------------------
# Message pieces, written as contract.cpp writes them.


def shape_str(shape) -> str:
    if len(shape) == 1:
        return f"({shape[0]},)"
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _allowed_param_dtypes(input_dtype):
    return (input_dtype, torch.float32) if input_dtype in REDUCED_PRECISION else (input_dtype,)


# ---------------------------------------------------------------------------------------------
# One rule per kind of argument.


def _check_is_tensor(op, name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: expected {name} to be a Tensor, got {type(t).__name__}")


def check_input(op: str, input: torch.Tensor) -> None:
    _check_is_tensor(op, "input", input)
    if input.dtype not in FLOATING:
        raise TypeError(
            f"{op}: expected a floating-point input (float16, bfloat16, float32 or float64), "
            f"got {input.dtype}"
        )
    if input.dim() < 2:
        raise ValueError(
            f"{op}: expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}D "
            f"input of shape {shape_str(input.shape)}"
        )


def _check_device(op, name, t, input):
    if t.device != input.device:
        raise RuntimeError(f"{op}: expected all tensors on {input.device}, but {name} is on {t.device}")


def check_activation(op: str, name: str, t, input: torch.Tensor) -> None:
    """An activation-sized operand: the input's device, shape and dtype."""
    if t is None:
        return
    _check_is_tensor(op, name, t)
    _check_device(op, name, t, input)
    if t.shape != input.shape:
        raise ValueError(
            f"{op}: {name} shape {shape_str(t.shape)} does not match input shape {shape_str(input.shape)}"
        )
    if t.dtype != input.dtype:
        raise TypeError(f"{op}: {name} dtype {t.dtype} does not match input dtype {input.dtype}")


def check_per_channel(op: str, name: str, t, input: torch.Tensor) -> None:
    """A per-channel vector: the input's device, one value per channel, an allowed dtype."""
    if t is None:
        return
    _check_is_tensor(op, name, t)
    _check_device(op, name, t, input)
    channels = input.shape[1]
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(
            f"{op}: {name} should hold one value per channel, shape ({channels},) for input of "
            f"shape {shape_str(input.shape)}, got shape {shape_str(t.shape)}"
        )
    allowed = _allowed_param_dtypes(input.dtype)
    if t.dtype not in allowed:
        raise TypeError(
            f"{op}: {name} dtype {t.dtype} is not supported with a {input.dtype} input "
            f"(expected {' or '.join(str(d) for d in allowed)})"
        )


def check_running_stats(op: str, running_mean, running_var, training: bool) -> None:
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise ValueError(
            f"{op}: running_mean and running_var are required when training=False "
            "(eval mode normalizes with the running statistics)"
        )


def check_eps(op: str, eps, batch_statistics: bool) -> None:
    """x̂ = (x - mean) / sqrt(var + eps): a batch's variance can be 0 (a constant channel), so the
    batch statistics need eps > 0; the running variance is an average of batch variances whose
    caller vouches for it, and eps 0 is allowed there (AddReLU's identity statistics use it)."""
    if batch_statistics and not eps > 0:
        raise ValueError(f"{op}: eps must be positive when normalizing with batch statistics, got {eps:g}")
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be non-negative, got {eps:g}")


def check_values_per_channel(input: torch.Tensor) -> None:
    """Batch statistics need two values per channel (torch.nn.functional.batch_norm's text)."""
    if input.shape[0] * math.prod(input.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")


def check_act_mask(op: str, act_mask: torch.Tensor, input: torch.Tensor, expected_bytes: int) -> None:
    _check_is_tensor(op, "act_mask", act_mask)
    _check_device(op, "act_mask", act_mask, input)
    if act_mask.dtype != torch.uint8 or act_mask.dim() != 1:
        raise TypeError(
            f"{op}: act_mask should be a 1-D torch.uint8 tensor, got {act_mask.dtype} of shape "
            f"{shape_str(act_mask.shape)}"
        )
    n = act_mask.numel()
    if expected_bytes == 0 and n != 0:
        raise ValueError(
            f"{op}: act_mask holds {n} bytes; expected none (this backend's bn_act_fwd_train "
            "keeps no mask for this input)"
        )
    if n not in (0, expected_bytes):
        raise ValueError(
            f"{op}: act_mask holds {n} bytes; expected none or {expected_bytes} (the mask this "
            "backend's bn_act_fwd_train returns for this input)"
        )


# ---------------------------------------------------------------------------------------------
# The activations (docs/design.md, "Activations"): out = act(z), z = x̂·w + b (+ r).

# The backward finds the side of the kink from out (or the mask): out > 0 for relu and
# leaky_relu (negative_slope >= 0), 0 < out < 6 for relu6.
PIECEWISE_LINEAR = ("relu", "relu6", "leaky_relu")
# The backward recomputes z from x, the statistics, the parameters and the residual.
RECOMPUTED = ("silu", "hardswish", "gelu", "gelu_tanh")
ACTIVATIONS = PIECEWISE_LINEAR + ("identity",) + RECOMPUTED
DEFAULT_ACT = "relu"
DEFAULT_NEGATIVE_SLOPE = 0.01  # nn.LeakyReLU's


def backward_reads_out(act: str) -> bool:
    """Whether the backward of `act` reads out (else it recomputes z, or needs nothing: identity)."""
    return act in PIECEWISE_LINEAR


def backward_recomputes_z(act: str) -> bool:
    return act in RECOMPUTED


def check_act(op: str, act, negative_slope) -> None:
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)}")
    if act == "leaky_relu" and not negative_slope >= 0:
        raise ValueError(
            f"{op}: leaky_relu's negative_slope must be >= 0 for the fused op (got {negative_slope}): "
            "the backward tells the side of the kink from the output's sign"
        )


def check_out(op: str, out, input: torch.Tensor, act: str) -> None:
    """out of a backward op: required where the backward reads it, else optional (unused)."""
    if out is None and backward_reads_out(act):
        raise ValueError(f"{op}: out is required for the backward of {act}")
    check_activation(op, "out", out, input)


# ---------------------------------------------------------------------------------------------
# The checks of each op, in schema order.


def check_bn_act(input, residual, weight, bias, running_mean, running_var, training, eps,
                 act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE, op="bn_act", values_per_channel=True):
    """values_per_channel=False: SyncBatchNorm, whose batch statistics span several processes,
    checks the global count itself."""
    check_input(op, input)
    check_activation(op, "residual", residual, input)
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        check_per_channel(op, name, t, input)
    check_running_stats(op, running_mean, running_var, training)
    check_eps(op, eps, training)
    check_act(op, act, negative_slope)
    if training and values_per_channel:
        check_values_per_channel(input)


def check_fwd_train(input, residual, weight, bias, eps, act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE,
                    op="bn_act_fwd_train"):
    check_input(op, input)
    check_activation(op, "residual", residual, input)
    check_per_channel(op, "weight", weight, input)
    check_per_channel(op, "bias", bias, input)
    check_eps(op, eps, True)
    check_act(op, act, negative_slope)


def check_fwd_eval(input, residual, running_mean, running_var, weight, bias, eps, act=DEFAULT_ACT,
                   negative_slope=DEFAULT_NEGATIVE_SLOPE, op="bn_act_fwd_eval"):
    check_input(op, input)
    check_activation(op, "residual", residual, input)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        check_per_channel(op, name, t, input)
    check_eps(op, eps, False)
    check_act(op, act, negative_slope)


def check_bwd(grad_out, out, act_mask, input, weight, mean, invstd, act_mask_bytes, residual=None, bias=None,
              act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE, op="bn_act_bwd"):
    """act_mask_bytes: the length of the mask the backend's bn_act_fwd_train gives `input`."""
    check_input(op, input)
    check_activation(op, "grad_out", grad_out, input)
    check_out(op, out, input, act)
    check_act_mask(op, act_mask, input, act_mask_bytes)
    for name, t in (("weight", weight), ("mean", mean), ("invstd", invstd)):
        check_per_channel(op, name, t, input)
    _check_recompute_operands(op, residual, bias, input)
    check_act(op, act, negative_slope)


def _check_recompute_operands(op, residual, bias, input):
    check_activation(op, "residual", residual, input)
    check_per_channel(op, "bias", bias, input)


def check_stats(input, op="bn_stats"):
    check_input(op, input)


def check_bwd_reduce(grad_out, out, input, mean, invstd, residual=None, weight=None, bias=None, act=DEFAULT_ACT,
                     negative_slope=DEFAULT_NEGATIVE_SLOPE, op="bn_act_bwd_reduce"):
    check_input(op, input)
    check_activation(op, "grad_out", grad_out, input)
    check_out(op, out, input, act)
    check_per_channel(op, "mean", mean, input)
    check_per_channel(op, "invstd", invstd, input)
    check_activation(op, "residual", residual, input)
    check_per_channel(op, "weight", weight, input)
    check_per_channel(op, "bias", bias, input)
    check_act(op, act, negative_slope)


def check_bwd_apply(grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat, residual=None, bias=None,
                    act=DEFAULT_ACT, negative_slope=DEFAULT_NEGATIVE_SLOPE, op="bn_act_bwd_apply"):
    check_input(op, input)
    check_activation(op, "grad_out", grad_out, input)
    check_out(op, out, input, act)
    for name, t in (("weight", weight), ("mean", mean), ("invstd", invstd), ("mean_dz", mean_dz),
                    ("mean_dz_xhat", mean_dz_xhat)):
        check_per_channel(op, name, t, input)
    _check_recompute_operands(op, residual, bias, input)
    check_act(op, act, negative_slope)