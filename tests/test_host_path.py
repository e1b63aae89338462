"""The host path of a module call: one op forward (kernels and running-statistics update), the
count of the step, and one op backward, with no tiny side ops (counted with torch.profiler); an
eval call that records autograd, the op alone."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fused_resnet
from helpers import BACKENDS, DEVICE, OP_BACKENDS, make_tensor  # OP_BACKENDS: bn_act is one op


def _descendants(event):
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def _run_in(backward, top):
    """What ran directly in `backward` (the record_function around torch.autograd.backward), on
    every thread. The autograd engine runs the nodes of CPU tensors in the calling thread, where
    they nest in `backward`, and those of CUDA tensors in its device thread, where they are
    top-level events: these are the top-level events of other threads within its time range."""
    start, end = backward.time_range.start, backward.time_range.end
    elsewhere = [
        e for e in top
        if e.thread != backward.thread and start <= e.time_range.start and e.time_range.end <= end
    ]
    return list(backward.cpu_children) + elsewhere


def _profiled_step(module, inputs):
    y = module(*inputs)
    y.sum().backward()  # the first step: autograd's one-time setup out of the profile
    for t in (*module.parameters(), *inputs):
        t.grad = None  # AccumulateGrad then takes the gradients as they are, with no add_
    grad = torch.ones_like(y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        y = module(*inputs)
        with torch.profiler.record_function("test::backward"):
            torch.autograd.backward(y, grad)
    return [e for e in prof.events() if e.cpu_parent is None]


@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
@pytest.mark.parametrize("backend_name", OP_BACKENDS)
def test_a_training_step_is_one_op_forward_and_one_backward(backend_name, residual):
    cls = fused_resnet.nn.BatchNormAddReLU2d if residual else fused_resnet.nn.BatchNormReLU2d
    module = cls(4).to(DEVICE)
    x = make_tensor((2, 4, 3, 3), torch.float32).requires_grad_()
    inputs = (x, make_tensor(x.shape, torch.float32).requires_grad_()) if residual else (x,)
    with fused_resnet.use_backend(backend_name):
        top = _profiled_step(module, inputs)
    namespace = "fused_resnet_triton" if backend_name == "triton" else "fused_resnet"
    forward = [e.name for e in top if not e.name.startswith(("test::", "autograd::"))]
    assert forward == [f"{namespace}::bn_act", "aten::add_"], forward  # the op, num_batches_tracked
    name = "bn_add_relu" if residual else "bn_relu"
    assert [c.name for c in top[0].cpu_children] == [f"fused_resnet::{name}_fwd"]

    # the backward: one node besides the gradients' accumulation, whose only op is _bn_act_bwd
    # (so no gradient of the statistics is filled with zeros)
    (backward,) = [e for e in top if e.name == "test::backward"]
    nodes = [e for e in _run_in(backward, top) if "AccumulateGrad" not in e.name]
    assert len(nodes) == 1, [(e.name, e.thread) for e in nodes]
    in_node = list(_descendants(nodes[0]))
    bwd = [d for d in in_node if d.name == f"{namespace}::_bn_act_bwd"]
    assert len(bwd) == 1, [d.name for d in in_node]
    inside_bwd = {id(d) for d in _descendants(bwd[0])} | {id(bwd[0])}
    recorded = f"fused_resnet::{name}_bwd"  # the profiler's name around it
    assert recorded in {d.name for d in in_node}
    others = [
        d.name for d in in_node
        if d.name.startswith(("aten::", namespace)) and d.name != recorded and id(d) not in inside_bwd
    ]
    assert others == [], others


@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
@pytest.mark.parametrize("backend_name", OP_BACKENDS)
def test_an_eval_call_that_records_autograd_is_the_op_alone(backend_name, residual):
    """No cast, add or rsqrt of the running statistics around the op, as eager runs none: the
    backward reads the running buffers the forward read."""
    cls = fused_resnet.nn.BatchNormAddReLU2d if residual else fused_resnet.nn.BatchNormReLU2d
    module = cls(4).to(DEVICE).eval()
    x = make_tensor((2, 4, 3, 3), torch.float32).requires_grad_()
    inputs = (x, make_tensor(x.shape, torch.float32)) if residual else (x,)
    with fused_resnet.use_backend(backend_name):
        module(*inputs).sum().backward()  # first-call costs out of the profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            module(*inputs)
    top = [e for e in prof.events() if e.cpu_parent is None]
    namespace = "fused_resnet_triton" if backend_name == "triton" else "fused_resnet"
    assert [e.name for e in top] == [f"{namespace}::bn_act"], [e.name for e in top]
    inside = {d.name for d in _descendants(top[0])}
    extra = inside & {"aten::_to_copy", "aten::to", "aten::add_", "aten::rsqrt_", "aten::rsqrt", "aten::clone"}
    assert not extra, extra



@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_launches_skip_the_higher_order_op_dispatch(monkeypatch, training):
    """Every Triton launch of a module call (forward and backward) goes straight to its kernel:
    through wrap_triton's higher-order op each launch would pay for a dispatch of its own."""
    from torch._library.triton import is_wrap_triton_enabled
    from fused_resnet.triton import launch

    dispatched = []
    call = launch.Kernel.__call__

    def recording(kernel, grid, *args, **meta):
        dispatched.append(is_wrap_triton_enabled())
        return call(kernel, grid, *args, **meta)

    monkeypatch.setattr(launch.Kernel, "__call__", recording)
    module = fused_resnet.nn.BatchNormAddReLU2d(4).to(DEVICE).train(training)
    x = make_tensor((2, 4, 3, 3), torch.float32).requires_grad_()
    with fused_resnet.use_backend("triton"):
        module(x, make_tensor(x.shape, torch.float32)).sum().backward()
    assert dispatched and not any(dispatched), dispatched
