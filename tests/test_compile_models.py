"""torch.compile(fullgraph=True) over converted models and the fused ResNets: no graph break, the
same outputs, gradients and running statistics as the uncompiled model (aot_eager: dynamo capture,
the fake impls and AOT autograd, where a graph would break)."""

import copy

import pytest
import torch

import fused_resnet
from fused_resnet import models
from helpers import BACKENDS, DEVICE, TRITON_INTERPRETED, dynamo_backend_for, make_tensor, no_tf32
from parity import assert_close_at_scale, assert_same_state
import seed_models as seeds


@pytest.fixture(autouse=True)
def _float32_convolutions():
    """Compiled and uncompiled float32 models compared at the float32 tolerance: not in TF32
    (CUDA's default for float32 convolutions, ~1e-3 relative error, whose different roundings on
    the two sides can also flip the ReLU mask where a pre-activation lies near 0)."""
    with no_tf32():
        yield


MODELS = {
    "001_converted": (
        lambda: fused_resnet.convert(seeds.CifarResNet(seeds.CifarBasicBlock, [1, 1, 1], width=4)),
        (4, 3, 12, 12),
    ),
    "003_converted": (lambda: fused_resnet.convert(seeds.ResidualNet(12, 16, 5, 2)), (8, 12)),
    "resnet_fused_blocks": (
        lambda: models.ResNet(fused_resnet.nn.Bottleneck, [1, 1, 1, 1], num_classes=5), (2, 3, 48, 48)
    ),
}
COMPILED = [b for b in BACKENDS if b != "reference"]
# Under the Triton interpreter a whole ResNet takes minutes (every program of every launch runs in
# Python); the two converted seed models already put the Triton ops through torch.compile, and the
# fused ResNet's blocks are compiled with the C++ backend here and with Triton on a GPU.
CASES = [
    pytest.param(
        name, backend_name,
        marks=pytest.mark.skip(reason="a whole ResNet under the Triton interpreter (a GPU run covers it)")
        if backend_name == "triton" and TRITON_INTERPRETED and name == "resnet_fused_blocks" else (),
    )
    for name in MODELS
    for backend_name in COMPILED
]


@pytest.mark.skipif(not COMPILED, reason="no compiled backend (fused_resnet._C not built)")
@pytest.mark.parametrize("name, backend_name", CASES)
def test_compiled_converted_model(backend_name, name):
    factory, shape = MODELS[name]
    torch._dynamo.reset()
    with fused_resnet.use_backend(backend_name):
        _compare_compiled(factory, shape, dynamo_backend_for(backend_name))


def _compare_compiled(factory, shape, compile_backend):
    torch.manual_seed(0)
    model = factory().to(DEVICE)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    for training in (True, False):
        model.train(training)
        reference.train(training)
        x = make_tensor(shape, torch.float32).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        out, ref = compiled(x), reference(x_ref)
        assert_close_at_scale(out, ref, torch.float32, f"training={training}: output")
        out.sum().backward()
        ref.sum().backward()
        assert_close_at_scale(x.grad, x_ref.grad, torch.float32, f"training={training}: grad of input")
        for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            assert_close_at_scale(p.grad, q.grad, torch.float32, f"training={training}: grad of {n}")
        assert_same_state(model, reference, torch.float32, f"training={training}")


def test_compiled_inference_model():
    torch._dynamo.reset()
    model = seeds.CifarResNet(seeds.CifarBasicBlock, [1, 1, 1], width=4).to(DEVICE).eval()
    optimized = fused_resnet.optimize_for_inference(model)
    compiled = torch.compile(optimized, fullgraph=True, backend="aot_eager")
    x = make_tensor((3, 3, 12, 12), torch.float32)
    with torch.no_grad():
        assert_close_at_scale(compiled(x), model(x), torch.float32, "output")


@pytest.mark.skipif("cpu" not in COMPILED or DEVICE.type != "cpu", reason="the CPU kernels under inductor")
def test_inductor_passes_its_own_layout_through():
    """Inductor runs CPU convolutions channels_last; the ops take any layout (the flexible_layout
    tag), so it hands them channels_last activations (whose training forward keeps a ReLU mask
    for the backward) instead of converting to NCHW and back around each. Same results."""
    torch._dynamo.reset()
    with fused_resnet.use_backend("cpu"):
        _compare_compiled(lambda: fused_resnet.nn.BasicBlock(8, 8), (2, 8, 10, 10), "inductor")


@pytest.mark.skipif(not COMPILED, reason="no compiled backend (fused_resnet._C not built)")
@pytest.mark.parametrize("backend_name", COMPILED)
def test_compiled_eval_is_the_eager_composition(backend_name):
    """Under torch.compile a training call is the fused op, and an eval call the eager
    composition, which the compiler fuses with its neighbours like nn.BatchNorm's."""
    targets = []

    def record(gm, example_inputs):
        targets.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm

    module = fused_resnet.nn.BatchNormAddReLU2d(4).to(DEVICE)
    x, r = make_tensor((2, 4, 3, 3), torch.float32), make_tensor((2, 4, 3, 3), torch.float32)
    torch._dynamo.reset()
    with fused_resnet.use_backend(backend_name):
        compiled = torch.compile(module, fullgraph=True, backend=record)
        train_out = compiled(x, r)
        module.eval()
        eval_out = compiled(x, r)
        assert_close_at_scale(eval_out, module(x, r), torch.float32, "eval output")
    assert train_out.shape == x.shape
    train_ops, eval_ops = targets
    assert any(t.endswith("bn_act.default") for t in train_ops), train_ops
    assert not any("fused_resnet" in t for t in eval_ops) and any("batch_norm" in t for t in eval_ops), eval_ops
