"""python -m fused_resnet.bench --overhead: host time per module call, fused against eager.

The tensors are tiny (a few hundred elements), so the kernels cost next to nothing and what is
measured is the host path: Python, argument checks, dispatch, autograd bookkeeping, the ops
launched besides the kernel. Each case builds, on the same device:
  eager      relu(bn(x) (+ residual)) with nn.BatchNorm*d and nn.ReLU(inplace=True), the calls a
             model's forward makes
  <backend>  fused(x (, residual)) with fused_resnet.nn.BatchNormReLU*d / BatchNormAddReLU*d,
             that backend selected (outside the timed calls)
and times them interleaved, round by round, with torch.utils.benchmark on one thread; the table
gives the median µs per call over the rounds and fused / eager. On CUDA a call's time includes its
launches (the GPU finishes tiny kernels faster than the host issues them), and each row also
counts the GPU activities (kernels, memsets, copies) of one call per provider, with the profiler
("launches"; their names in overhead.json).

Modes: "eval" (forward under no_grad), "eval-grad" (an eval-mode forward that records autograd:
an input that requires grad, as fine-tuning with frozen BatchNorm statistics runs it),
"train-fwd" (forward that records autograd and updates the running statistics), "train-fwd+bwd"
(that forward, then backward to input, residual, weight and bias).
"""

import contextlib
import statistics
import sys

import torch
import torch.utils.benchmark as benchmark
from torch import nn

import fused_resnet

MODES = ("eval", "eval-grad", "train-fwd", "train-fwd+bwd")
SHAPES = {1: (4, 8, 16), 2: (2, 8, 4, 4), 3: (2, 8, 2, 2, 4)}  # 128 elements each
EAGER_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _eager_forward(op, dims, channels, device, training):
    """relu(bn(x) (+ r)), as a model's forward calls the two modules."""
    bn = EAGER_NORMS[dims](channels).to(device).train(training)
    relu = nn.ReLU(inplace=True)
    if op == "bn_add_relu":
        return lambda x, r: relu(bn(x) + r)
    return lambda x: relu(bn(x))


def _fused_forward(op, dims, channels, device, training):
    name = f"BatchNorm{'AddReLU' if op == 'bn_add_relu' else 'ReLU'}{dims}d"
    return getattr(fused_resnet.nn, name)(channels).to(device).train(training)


def make_call(provider, op, dims, mode, device):
    """A no-argument callable: one module call (and its backward) for the case."""
    shape = SHAPES[dims]
    build = _eager_forward if provider == "eager" else _fused_forward
    module = build(op, dims, shape[1], device, mode.startswith("train"))
    x = torch.randn(shape, device=device, requires_grad=mode in ("eval-grad", "train-fwd+bwd"))
    args = (x, torch.randn(shape, device=device, requires_grad=x.requires_grad)) if op == "bn_add_relu" else (x,)
    grad = torch.randn(shape, device=device)

    def forward():
        return module(*args)

    if mode == "eval":

        def call():
            with torch.no_grad():
                return forward()

    elif mode in ("eval-grad", "train-fwd"):
        call = forward
    else:

        def call():
            forward().backward(grad)

    return call


def _selected(provider):
    """The backend selection a provider's calls run under (eager: whatever is selected)."""
    return contextlib.nullcontext() if provider == "eager" else fused_resnet.use_backend(provider)


def time_interleaved(calls, device, rounds, number):
    """{provider: [µs per call, one per round]}, the providers taking turns within each round."""
    timers = {
        name: benchmark.Timer(stmt="call()", globals={"call": call}, num_threads=1) for name, call in calls.items()
    }
    for name, call in calls.items():  # warm-up: first-call costs (kernel choice, allocator) out of the way
        with _selected(name):
            for _ in range(20):
                call()
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, timer in timers.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            with _selected(name):
                samples[name].append(timer.timeit(number).mean * 1e6)
    return samples


def gpu_activities(call, provider):
    """The names of the GPU activities (kernels, memsets, copies) one call of `call` runs, as the
    profiler records them: the launches a module call costs, beside its host time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _selected(provider):
        call()  # first-call costs out of the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]


def providers(device):
    """eager and every fused backend that runs `device` as a product would: the Triton
    interpreter (CPU tensors) is a test vehicle, not a provider."""
    names = fused_resnet.available_backends(device)
    if device.type == "cpu":
        names = [n for n in names if n != "triton"]
    return ["eager"] + names


def run(device, rounds=7, number=200, ops=("bn_relu", "bn_add_relu"), dims=(1, 2, 3), modes=MODES, out=None):
    """Time every case; print the table (to `out`, default stdout); return the rows."""
    out = out or sys.stdout
    device = torch.device(device)
    names = providers(device)
    rows = []
    header = f"{'case':34}" + "".join(f"{n + ' µs':>14}" for n in names) + "".join(
        f"{n + '/eager':>16}" for n in names[1:]
    )
    print(f"host µs per call, median of {rounds} interleaved rounds of {number} calls, 1 thread, {device}", file=out)
    print(header, file=out, flush=True)
    for op in ops:
        for d in dims:
            for mode in modes:
                calls = {name: make_call(name, op, d, mode, device) for name in names}
                samples = time_interleaved(calls, device, rounds, number)
                median = {name: statistics.median(s) for name, s in samples.items()}
                row = {"op": op, "dims": d, "mode": mode, "us_per_call": median, "samples_us": samples}
                label = f"{op} {d}d {mode}"
                line = f"{label:34}" + "".join(f"{median[n]:14.1f}" for n in names) + "".join(
                    f"{median[n] / median['eager']:16.2f}" for n in names[1:]
                )
                if device.type == "cuda":
                    row["gpu_activities"] = {name: gpu_activities(call, name) for name, call in calls.items()}
                    line += "   launches " + " ".join(
                        f"{name} {len(row['gpu_activities'][name])}" for name in names
                    )
                rows.append(row)
                print(line, file=out, flush=True)
    return rows
