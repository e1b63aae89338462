"""Drop-in BatchNorm modules with a fused activation, or a fused residual add + activation.

Each subclasses the nn.BatchNorm1d/2d/3d it replaces: same constructor, parameters, buffers and
state_dict keys (so state dicts load strictly in both directions), same running-statistics
semantics (momentum, momentum=None as a cumulative average, num_batches_tracked,
track_running_stats=False, affine=False).

    BatchNormReLU2d(C)(x)                        == relu(BatchNorm2d(C)(x))
    BatchNormAddReLU2d(C)(x, r)                  == relu(BatchNorm2d(C)(x) + r)
    BatchNormAct2d(C, act="silu")(x)             == silu(BatchNorm2d(C)(x))
    BatchNormAddAct2d(C, act="identity")(x, r)   == BatchNorm2d(C)(x) + r

`act` is one of contract.ACTIVATIONS: relu, relu6, leaky_relu (with negative_slope >= 0),
identity, silu, hardswish, gelu, gelu_tanh (docs/design.md, "Activations").

Unlike eager nn.BatchNorm, which increments num_batches_tracked before it raises, every check runs
first: a refused call changes no state.
"""

import torch
from torch import nn

from .. import backend as _backend
from .. import contract, functional
from ..contract import DEFAULT_ACT, DEFAULT_NEGATIVE_SLOPE, acc_dtype, shape_str
from ..reference import update_running_stats
from .tracing import record_module_call, refuse_script


def check_channels(module, input):
    """The input has the module's num_features channels (rank 2 or more)."""
    if input.dim() >= 2 and input.shape[1] != module.num_features:
        raise ValueError(
            f"{type(module).__name__}: expected input with {module.num_features} channels "
            f"(num_features), got {input.shape[1]} channels in input of shape "
            f"{shape_str(input.shape)}"
        )


def _tensor(module, store, name):
    """module.<name>, read from its parameter or buffer dict `store`: nn.Module.__getattr__ costs
    about 1 µs a name, and a module call reads five. A name not there (torch.nn.utils.parametrize
    moves a parametrized tensor out) is read through getattr."""
    return store[name] if name in store else getattr(module, name)


class _FusedBatchNormMixin:
    """nn.BatchNorm's forward as one op call, with the input checks before any state changes.

    `act` and `negative_slope` are the activation the op applies: class attributes on the ReLU
    modules, set by the constructor of the modules that take them (_ActArguments)."""

    act = DEFAULT_ACT
    negative_slope = DEFAULT_NEGATIVE_SLOPE

    def _mode(self):
        """(batch_stats, running_mean, running_var, counts_steps) as nn.BatchNorm decides them.

        Batch statistics in training, and in eval when there are no running ones. The running
        buffers are read in eval, and updated in training if they are tracked (else None); a
        training step is counted in num_batches_tracked when the statistics are tracked.
        """
        buffers = self._buffers
        running_mean = _tensor(self, buffers, "running_mean")
        running_var = _tensor(self, buffers, "running_var")
        if not self.training:
            return running_mean is None and running_var is None, running_mean, running_var, False
        if not self.track_running_stats:
            return True, None, None, False
        return True, running_mean, running_var, _tensor(self, buffers, "num_batches_tracked") is not None

    def _step_momentum(self, counts_steps):
        """The running-stats momentum of this step: `momentum`, or, when it is None, the
        cumulative average 1 / num_batches_tracked as it is once this step is counted."""
        if self.momentum is not None:
            return self.momentum
        return 1.0 / (float(self.num_batches_tracked) + 1.0) if counts_steps else 0.0

    def _fused_forward(self, input, residual):
        # The host time of a module call is this, one op call (which checks the arguments,
        # csrc/common/contract.cpp) and the count of the step: each name is read once.
        self._check_input_dim(input)  # nn.BatchNorm*d's own rank check and message
        check_channels(self, input)
        batch_stats, running_mean, running_var, counts_steps = self._mode()
        params = self._parameters
        weight, bias = _tensor(self, params, "weight"), _tensor(self, params, "bias")
        if self.momentum is None and counts_steps and torch.compiler.is_compiling():
            out = self._compiled_cumulative_step(input, residual, weight, bias, running_mean, running_var)
        else:
            out = functional.batch_norm_act(
                input, residual, weight, bias, running_mean, running_var, batch_stats,
                self._step_momentum(counts_steps), self.eps, self.act, self.negative_slope,
            )
        if counts_steps:  # counted once the step went through: a refused call counts nothing
            _tensor(self, self._buffers, "num_batches_tracked").add_(1)
        return out

    def _compiled_cumulative_step(self, input, residual, weight, bias, running_mean, running_var):
        """A training step with momentum=None under torch.compile: the cumulative average's
        momentum 1 / (num_batches_tracked + 1) is a tensor there (a float of it would be a value
        the op's float argument cannot take), so the step runs the training forward op and
        updates the running statistics with that tensor, in the graph the compiler fuses."""
        out, mean, _invstd, var, _mask = _backend.ops_for(input).bn_act_fwd_train(
            input, residual, weight, bias, self.eps, self.act, self.negative_slope
        )
        momentum = 1.0 / (_tensor(self, self._buffers, "num_batches_tracked").to(mean.dtype) + 1.0)
        count = input.numel() // input.shape[1]
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(), count, momentum)
        return out

    __prepare_scriptable__ = refuse_script


class _BatchNormAct(_FusedBatchNormMixin):
    """act(bn(x)): one input."""

    def forward(self, input):
        traced = record_module_call(self, input)  # a leaf for torch.fx (nn/tracing.py)
        return traced if traced is not None else self._fused_forward(input, None)


class _BatchNormAddAct(_FusedBatchNormMixin):
    """act(bn(x) + residual): two inputs."""

    def forward(self, input, residual):
        traced = record_module_call(self, input, residual)
        return traced if traced is not None else self._fused_forward(input, residual)


class BatchNormReLU1d(_BatchNormAct, nn.BatchNorm1d):
    """relu(BatchNorm1d(x)) for (N, C) or (N, C, L) input."""


class BatchNormReLU2d(_BatchNormAct, nn.BatchNorm2d):
    """relu(BatchNorm2d(x)) for (N, C, H, W) input."""


class BatchNormReLU3d(_BatchNormAct, nn.BatchNorm3d):
    """relu(BatchNorm3d(x)) for (N, C, D, H, W) input."""


class BatchNormAddReLU1d(_BatchNormAddAct, nn.BatchNorm1d):
    """relu(BatchNorm1d(x) + residual) for (N, C) or (N, C, L) input."""


class BatchNormAddReLU2d(_BatchNormAddAct, nn.BatchNorm2d):
    """relu(BatchNorm2d(x) + residual) for (N, C, H, W) input."""


class BatchNormAddReLU3d(_BatchNormAddAct, nn.BatchNorm3d):
    """relu(BatchNorm3d(x) + residual) for (N, C, D, H, W) input."""


def activation_repr(module) -> str:
    """The activation of a fused module as its repr shows it: act='silu' (and leaky_relu's slope)."""
    slope = f", negative_slope={module.negative_slope}" if module.act == "leaky_relu" else ""
    return f"act={module.act!r}{slope}"


class _ActArguments:
    """The constructor of nn.BatchNorm*d, with the activation as keywords after its arguments."""

    def __init__(self, *args, act: str = DEFAULT_ACT, negative_slope: float = DEFAULT_NEGATIVE_SLOPE, **kwargs):
        contract.check_act(type(self).__name__, act, negative_slope)  # before anything is built
        super().__init__(*args, **kwargs)
        self.act = act
        self.negative_slope = float(negative_slope)

    def extra_repr(self):
        return f"{super().extra_repr()}, {activation_repr(self)}"


class BatchNormAct1d(_ActArguments, _BatchNormAct, nn.BatchNorm1d):
    """act(BatchNorm1d(x)) for (N, C) or (N, C, L) input."""


class BatchNormAct2d(_ActArguments, _BatchNormAct, nn.BatchNorm2d):
    """act(BatchNorm2d(x)) for (N, C, H, W) input."""


class BatchNormAct3d(_ActArguments, _BatchNormAct, nn.BatchNorm3d):
    """act(BatchNorm3d(x)) for (N, C, D, H, W) input."""


class BatchNormAddAct1d(_ActArguments, _BatchNormAddAct, nn.BatchNorm1d):
    """act(BatchNorm1d(x) + residual) for (N, C) or (N, C, L) input."""


class BatchNormAddAct2d(_ActArguments, _BatchNormAddAct, nn.BatchNorm2d):
    """act(BatchNorm2d(x) + residual) for (N, C, H, W) input."""


class BatchNormAddAct3d(_ActArguments, _BatchNormAddAct, nn.BatchNorm3d):
    """act(BatchNorm3d(x) + residual) for (N, C, D, H, W) input."""


# ---------------------------------------------------------------------------------------------
# Turning an eager BatchNorm into its fused twin, for the blocks and for fused_resnet.convert.

_FUSED_TWIN = {
    (nn.BatchNorm1d, False): BatchNormReLU1d,
    (nn.BatchNorm2d, False): BatchNormReLU2d,
    (nn.BatchNorm3d, False): BatchNormReLU3d,
    (nn.BatchNorm1d, True): BatchNormAddReLU1d,
    (nn.BatchNorm2d, True): BatchNormAddReLU2d,
    (nn.BatchNorm3d, True): BatchNormAddReLU3d,
}
_FUSED_ACT_TWIN = {
    (nn.BatchNorm1d, False): BatchNormAct1d,
    (nn.BatchNorm2d, False): BatchNormAct2d,
    (nn.BatchNorm3d, False): BatchNormAct3d,
    (nn.BatchNorm1d, True): BatchNormAddAct1d,
    (nn.BatchNorm2d, True): BatchNormAddAct2d,
    (nn.BatchNorm3d, True): BatchNormAddAct3d,
}

EAGER_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Where fused_resnet.convert keeps, on a BatchNorm it fused, the class it had (for unfuse).
UNFUSED_CLASS = "_fused_resnet_unfused_class"


def fuse_batchnorm_(
    bn: nn.Module, with_residual: bool = False, act: str = DEFAULT_ACT,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> nn.Module:
    """Make the eager `bn` (exactly nn.BatchNorm1d/2d/3d) its fused twin, in place, and return it.

    with_residual=False gives forward(x) = act(bn(x)), True forward(x, r) = act(bn(x) + r): a
    BatchNormReLU*d / BatchNormAddReLU*d for act="relu", else a BatchNormAct*d /
    BatchNormAddAct*d. Only the class (and the activation's attributes) change: the object keeps
    its parameters and buffers (the same tensors, so optimizers holding them stay valid), its
    settings (eps, momentum, affine, track_running_stats), train/eval mode, device, dtype and hooks.
    """
    twins = _FUSED_TWIN if act == "relu" else _FUSED_ACT_TWIN
    twin = twins.get((type(bn), with_residual))
    if twin is None:
        raise TypeError(
            f"fuse_batchnorm_: expected an nn.BatchNorm1d, nn.BatchNorm2d or nn.BatchNorm3d, got "
            f"{type(bn).__module__}.{type(bn).__qualname__}"
        )
    contract.check_act("fuse_batchnorm_", act, negative_slope)
    bn.__class__ = twin
    if act != "relu":
        bn.act, bn.negative_slope = act, float(negative_slope)
    return bn


def activation_module(act: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> nn.Module:
    """The torch.nn module that applies `act` (unfuse puts it back after the BatchNorm)."""
    contract.check_act("activation_module", act, negative_slope)
    return {
        "relu": lambda: nn.ReLU(),
        "relu6": lambda: nn.ReLU6(),
        "leaky_relu": lambda: nn.LeakyReLU(negative_slope),
        "identity": lambda: nn.Identity(),
        "silu": lambda: nn.SiLU(),
        "hardswish": lambda: nn.Hardswish(),
        "gelu": lambda: nn.GELU(),
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    }[act]()


class AddReLU(nn.Module):
    """relu(x + residual): a BatchNormAddReLU*d once its normalization is folded into the
    preceding convolution (fused_resnet.optimize_for_inference).

    It runs the fused eval kernel with identity statistics, mean 0, var 1 and eps 0, so that
    (x - 0) * rsqrt(1 + 0) = x exactly: one pass reading x and the residual and writing the
    output, where an eager add + ReLU makes two.
    """

    __prepare_scriptable__ = refuse_script
    act = DEFAULT_ACT  # AddAct (convert/inference.py) sets its own
    negative_slope = DEFAULT_NEGATIVE_SLOPE

    def forward(self, input, residual):
        traced = record_module_call(self, input, residual)
        if traced is not None:
            return traced
        channels = input.shape[1] if input.dim() >= 2 else 0
        stats_dtype = acc_dtype(input.dtype) if input.dtype.is_floating_point else input.dtype
        mean = torch.zeros(channels, dtype=stats_dtype, device=input.device)
        var = torch.ones(channels, dtype=stats_dtype, device=input.device)
        return functional.batch_norm_act(
            input, residual, None, None, mean, var, False, 0.0, 0.0, self.act, self.negative_slope
        )
