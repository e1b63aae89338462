"""The runners of fused_resnet.bench: one no-argument call per provider and case (op level: the
eager composition, torch.compile of it, or a fused backend; model level: a training step or an
inference batch of a fused_resnet.models ResNet or a converted torchvision model), with inputs
rotated out of the last-level cache.
"""

import contextlib
import functools
import itertools
import math

import torch
import torch.nn.functional as F

import fused_resnet

from ..contract import DEFAULT_NEGATIVE_SLOPE
from ..reference import activation
from .cases import TORCHVISION_MODELS, memory_format, op_parts


def cache_bytes(device):
    """The last-level cache: L2 on a GPU, the largest CPU cache level from sysfs (32 MiB if unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for index in range(8):
        path = f"/sys/devices/system/cpu/cpu0/cache/index{index}/size"
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            break
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 << 20)


# The input sets of one runner span this many last-level caches. A cache does not replace lines
# in strict LRU order, so data streamed over twice its size is still partly found there; from
# about four times on, the rate a call sees settles to the rate of memory.
ROTATION_CACHES = 4

# Tiny tensors (tests) cannot leave the cache in any number of sets: the rotation stops here.
MAX_INPUT_SETS = 1024


def input_set_count(set_bytes, device):
    """How many input sets to rotate so that a call does not find its inputs in the cache.

    `set_bytes` is what one set holds: the tensors a call reads that exist before it (x, r, dy).
    Outputs are not counted: each call's come from the allocator, which hands back the memory
    the previous call's outputs freed, the same addresses every call.
    """
    return max(1, min(MAX_INPUT_SETS, math.ceil(ROTATION_CACHES * cache_bytes(device) / max(set_bytes, 1))))


def _eager_composition(x, r, running_mean, running_var, weight, bias, training, act):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)
    return activation(y + r if r is not None else y, act, DEFAULT_NEGATIVE_SLOPE)


def _fused_composition(x, r, running_mean, running_var, weight, bias, training, act):
    return fused_resnet.functional.batch_norm_activation(
        x, running_mean, running_var, weight, bias, training, 0.1, 1e-5, residual=r, act=act
    )


def _op_function(provider, act):
    """fn(x, r, running_mean, running_var, weight, bias, training) of the provider for `act`."""
    if provider == "eager":
        return functools.partial(_eager_composition, act=act)
    if provider == "compile":
        return torch.compile(functools.partial(_eager_composition, act=act), dynamic=False)

    def fused(*args):
        with fused_resnet.use_backend(provider):
            return _fused_composition(*args, act=act)

    return fused


def make_runner(provider, op, shape, layout, dtype, mode, device, rotate=True):
    """A no-argument callable running one iteration of the case with the provider.

    With `rotate`, successive calls cycle through enough independent input sets that the data
    of one call has left the last-level cache when it comes round again.
    """
    device = torch.device(device)
    fmt = memory_format(layout, len(shape))
    channels = shape[1]
    param_dtype = torch.float32 if dtype != torch.float64 else dtype
    training = mode != "eval"
    weight = torch.rand(channels, device=device, dtype=param_dtype) + 0.5
    bias = torch.randn(channels, device=device, dtype=param_dtype)
    # Training modes record the autograd graph as a training step does; "train-fwd" drops it.
    weight.requires_grad_(training)
    bias.requires_grad_(training)
    act, residual = op_parts(op)
    # x, and r for bn_add_<act> and dy for a backward: the tensors of one set
    tensors_per_set = 1 + residual + (mode == "train-fwd+bwd")
    set_bytes = tensors_per_set * math.prod(shape) * (torch.finfo(dtype).bits // 8)
    n_sets = input_set_count(set_bytes, device) if rotate else 1

    def random():
        # drawn contiguous, then laid out: randn_like of a channels_last tensor draws several
        # times slower, which the hundreds of sets of a small case would feel
        return torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)

    def input_set():
        x = random()
        r = random() if residual else None
        stats = (torch.zeros(channels, device=device, dtype=param_dtype), torch.ones(channels, device=device, dtype=param_dtype))
        grad_out = random() if mode == "train-fwd+bwd" else None
        if training:
            x.requires_grad_(True)
            if r is not None:
                r.requires_grad_(True)
        return x, r, stats, grad_out

    sets = [input_set() for _ in range(n_sets)]
    fn = _op_function(provider, act)
    cycle = itertools.cycle(sets)

    if mode == "eval":

        def run():
            x, r, (running_mean, running_var), _ = next(cycle)
            with torch.no_grad():
                return fn(x, r, running_mean, running_var, weight, bias, False)

    elif mode == "train-fwd":

        def run():
            x, r, (running_mean, running_var), _ = next(cycle)
            return fn(x, r, running_mean, running_var, weight, bias, True)

    else:

        def run():
            x, r, (running_mean, running_var), grad_out = next(cycle)
            inputs = [t for t in (x, r, weight, bias) if t is not None]
            y = fn(x, r, running_mean, running_var, weight, bias, training)
            return torch.autograd.grad(y, inputs, grad_out)

    return run


def make_copy_runner(shape, layout, dtype, device):
    """A copy of rotated input sets into one output tensor: what an op case's providers are held
    against on a CPU.

    It reads and writes as they do: inputs rotated out of the cache by the same rule, and an
    output at the same addresses every call, as the allocator hands a provider's output the memory
    the previous call's freed (without the allocation's cost, so the copy is the faster for it).
    It is timed in their rounds, on their threads, so whatever slows the machine meanwhile
    (another process on a shared core, the host) slows it alike. Bytes: read x, write the copy.
    """
    device = torch.device(device)
    fmt = memory_format(layout, len(shape))
    n_sets = input_set_count(math.prod(shape) * (torch.finfo(dtype).bits // 8), device)
    sets = [torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt) for _ in range(n_sets)]
    cycle = itertools.cycle(sets)
    out = torch.empty(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)

    def run():
        return out.copy_(next(cycle))

    return run


def _autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def build_model(name, num_classes, fused):
    """A model case's model: a fused_resnet.models ResNet (its fused twin if `fused`), or one of
    torchvision's TORCHVISION_MODELS, fused by fused_resnet.convert as a user's model is."""
    if name not in TORCHVISION_MODELS:
        from .. import models

        return getattr(models, name)(num_classes=num_classes, fused=fused)
    try:
        import torchvision
    except ImportError as e:
        raise ImportError(f"the model case {name} needs torchvision: {e}") from e
    model = getattr(torchvision.models, name)(num_classes=num_classes)
    return fused_resnet.convert(model) if fused else model


def make_model_runner(provider, model_name, input_shape, mode, device, dtype, layout):
    """One inference batch ("eval") or one SGD training step ("train") of the model.

    A training runner also has `training_forward`: the step's forward alone, returning the loss
    with its autograd graph, which holds what the backward will need (timing.backward_kept_bytes).
    """
    device = torch.device(device)
    torch.manual_seed(0)
    num_classes = 1000 if device.type == "cuda" else 10
    fused = provider in ("fused", "fused+compile")
    model = build_model(model_name, num_classes, fused).to(device)
    fmt = memory_format(layout, len(input_shape))
    model = model.to(memory_format=fmt) if fmt != torch.contiguous_format else model
    # Static shapes, as for the op-level composition: the bench times one input shape per case.
    forward = torch.compile(model, dynamic=False) if provider.endswith("compile") else model
    x = torch.randn(input_shape, device=device).contiguous(memory_format=fmt)
    target = torch.randint(0, num_classes, (input_shape[0],), device=device)

    if mode == "eval":
        model.eval()

        def run():
            with torch.no_grad(), _autocast(device, dtype):
                return forward(x)

        return run

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def training_forward():
        with _autocast(device, dtype):
            return F.cross_entropy(forward(x), target)

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = training_forward()
        loss.backward()
        optimizer.step()
        return loss

    run.training_forward = training_forward
    return run
