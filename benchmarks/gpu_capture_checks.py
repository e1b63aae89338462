"""Checks of gpu_correctness.py for the module op, bn_act (the forward that updates the running
statistics in place), under CUDA graphs: captured by hand and replayed, and under
torch.compile(mode="reduce-overhead") (inductor's CUDA graphs, which eager BatchNorm's mutated
buffers make inductor skip, pytorch#139207). Each compares outputs and running statistics, step
by step, with a float64 eager twin fed the same inputs, and says whether CUDA graphs were taken.
"""

import torch
import torch.nn.functional as F

import fused_resnet
from gpu_checks import Errors, capture, make

SHAPE = (16, 32, 14, 14)


def _twin_step(bn64, x, r):
    """relu(batch_norm(x) + r) in float64 with bn64's running buffers, updated as eager does."""
    y = F.batch_norm(x.double(), bn64.running_mean, bn64.running_var, bn64.weight, bn64.bias, True,
                     bn64.momentum, bn64.eps)
    return torch.relu(y + r.double())


def _pair(device):
    bn = fused_resnet.nn.BatchNormAddReLU2d(SHAPE[1]).to(device)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_()
    bn.running_mean.normal_()
    twin = torch.nn.BatchNorm2d(SHAPE[1]).to(device).double()
    twin.load_state_dict(bn.state_dict())
    return bn, twin


def _compare_state(errs, bn, twin, when):
    errs.add(f"running_mean {when}", bn.running_mean, twin.running_mean)
    errs.add(f"running_var {when}", bn.running_var, twin.running_var)


def check_bn_act_graph(backend, device, dtype=torch.float32):
    """A training forward of BatchNormAddReLU2d captured in a CUDA graph, replayed on 3 new
    inputs: each replay's output and running statistics against the float64 twin's step."""
    bn, twin = _pair(device)
    x = make(SHAPE, dtype, "channels_last", device)
    r = make(SHAPE, dtype, "channels_last", device)
    errs = Errors(dtype)
    with fused_resnet.use_backend(backend):
        warmups = 3
        graph, out = capture(lambda: bn(x, r), warmups)
        for _ in range(warmups):  # the twin takes the warm-up's steps too
            _twin_step(twin, x, r)
        # The capture records the kernels (the running update, num_batches_tracked's count)
        # without running them: the buffers are as the warm-up left them.
        _compare_state(errs, bn, twin, "after the warm-up and the capture")
        for step in range(3):
            with torch.no_grad():
                x.copy_(make(SHAPE, dtype, "channels_last", device, offset=step))
                r.copy_(make(SHAPE, dtype, "channels_last", device))
            graph.replay()
            expected = _twin_step(twin, x, r)
            errs.add(f"replay {step} output", out, expected)
            _compare_state(errs, bn, twin, f"after replay {step}")
    return errs, "captured training forward, 3 replays on new inputs, running statistics each step"


def check_bn_act_reduce_overhead(backend, device, dtype=torch.float32):
    """torch.compile(fullgraph=True, mode="reduce-overhead") of the module, training forward and
    backward, 4 steps on new inputs: outputs, grad_input and running statistics against the float64 twin;
    the detail says whether inductor's CUDA graphs were taken (no cudagraph skip counted)."""
    from torch._dynamo.utils import counters

    bn, twin = _pair(device)
    torch._dynamo.reset()
    counters.clear()

    compiled = torch.compile(bn, fullgraph=True, mode="reduce-overhead")
    errs = Errors(dtype)
    with fused_resnet.use_backend(backend):
        for i in range(4):
            x = make(SHAPE, dtype, "channels_last", device, offset=i).requires_grad_()
            r = make(SHAPE, dtype, "channels_last", device)
            y = compiled(x, r)
            (gx,) = torch.autograd.grad(y.square().sum(), (x,))
            y = y.detach().clone()  # a CUDA-graph output is overwritten by the next replay
            x64 = x.detach().double().requires_grad_()
            y64 = _twin_step(twin, x64, r)
            (gx64,) = torch.autograd.grad(y64.square().sum(), (x64,))
            errs.add(f"step {i} output", y, y64)
            errs.add(f"step {i} grad_input", gx, gx64, 10)  # |w|·invstd amplifies it (gpu_checks)
            _compare_state(errs, bn, twin, f"after step {i}")
    skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    taken = "CUDA graphs taken" if skips == 0 else f"CUDA graphs skipped ({skips} skip(s) counted)"
    return errs, f"{taken}; 4 compiled steps"


def skipped_on(device):
    """Why these checks do not run on `device`, or None."""
    return None if device.type == "cuda" else "CUDA graphs need a GPU"

