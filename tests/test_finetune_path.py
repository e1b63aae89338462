"""The op path of fine-tuning: eval-mode calls that record autograd (BatchNorms in eval, the rest of
the model training; their host path: test_host_path.py), eval under torch.compile refusing what the op refuses, momentum=None (the
cumulative average) under torch.compile(fullgraph=True), and a Triton call that fails changing no
state."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from helpers import BACKENDS, DEVICE, OP_BACKENDS, assert_close, dynamo_backend_for, make_tensor

@pytest.mark.parametrize("residual", [False, True], ids=["bn_relu", "bn_add_relu"])
def test_eval_backward_matches_eager_float64(backend, residual):
    cls = fused_resnet.nn.BatchNormAddReLU3d if residual else fused_resnet.nn.BatchNormReLU3d
    module = cls(3).to(DEVICE).double().eval()
    module.running_mean.normal_()
    module.running_var.uniform_(0.5, 1.5)
    module.weight.data.uniform_(0.5, 1.5)
    eager = nn.BatchNorm3d(3).to(DEVICE).double().eval()
    eager.load_state_dict(module.state_dict())
    x = make_tensor((2, 3, 2, 3, 4), torch.float64, "channels_last").requires_grad_()
    r = make_tensor(x.shape, torch.float64).requires_grad_() if residual else None
    grad = make_tensor(x.shape, torch.float64)
    out = module(x, r) if residual else module(x)
    got = torch.autograd.grad(out, [t for t in (x, r, module.weight, module.bias) if t is not None], grad)
    ref = F.relu(eager(x) + r if residual else eager(x))
    expected = torch.autograd.grad(ref, [t for t in (x, r, eager.weight, eager.bias) if t is not None], grad)
    assert_close(out, ref, torch.float64, "output")
    names = ["grad_input"] + (["grad_residual"] if residual else []) + ["grad_weight", "grad_bias"]
    for g, e, name in zip(got, expected, names):
        assert_close(g, e, torch.float64, name)


@pytest.mark.parametrize("backend_name", OP_BACKENDS)
def test_an_eval_backward_reads_the_running_statistics_as_eager_does(backend_name):
    """The eval backward reads the running buffers themselves, as eager's does: a training step
    that updates them between the forward and the backward changes both gradients alike. (The
    reference backend, eager's elementwise ops, keeps the statistics its forward computed.)"""
    fused = fused_resnet.nn.BatchNormReLU2d(4).to(DEVICE).double().eval()
    eager = nn.BatchNorm2d(4).to(DEVICE).double().eval()
    x = make_tensor((2, 4, 3, 3), torch.float64, offset=1.0).requires_grad_()
    x_eager = x.detach().clone().requires_grad_()
    with fused_resnet.use_backend(backend_name):
        out = fused(x)
    ref = F.relu(eager(x_eager))
    step = make_tensor(x.shape, torch.float64, scale=3.0, offset=2.0)
    with fused_resnet.use_backend(backend_name):
        fused.train()(step)
    eager.train()(step)
    grad = make_tensor(x.shape, torch.float64)
    out.backward(grad)
    ref.backward(grad)
    assert_close(x.grad, x_eager.grad, torch.float64, "grad_input")
    assert_close(fused.weight.grad, eager.weight.grad, torch.float64, "grad_weight")


# ---------------------------------------------------------------------------------------------
# torch.compile.


@pytest.mark.parametrize("backend_name", OP_BACKENDS + ["reference"])
def test_compiled_eval_refuses_what_the_op_refuses(backend_name):
    """A residual of shape (N, C, 1, 1) or of another dtype, which the eager composition would
    broadcast or promote: refused uncompiled, compiled (the same error), and under fullgraph=True
    (dynamo reports the same error as an exception it observed while tracing)."""
    module = fused_resnet.nn.BatchNormAddReLU2d(4).to(DEVICE).eval()
    x = make_tensor((2, 4, 3, 3), torch.float32)
    dynamo_backend = dynamo_backend_for(backend_name)
    cases = [
        (make_tensor((2, 4, 1, 1), torch.float32), ValueError, r"residual shape \(2, 4, 1, 1\) does not match"),
        (make_tensor(x.shape, torch.float64), TypeError, "residual dtype torch.float64 does not match"),
    ]
    with fused_resnet.use_backend(backend_name):
        for residual, error, message in cases:
            with pytest.raises(error, match=message):
                module(x, residual)
            torch._dynamo.reset()
            with pytest.raises(error, match=message):
                torch.compile(module, backend=dynamo_backend)(x, residual)
            torch._dynamo.reset()
            with pytest.raises(torch._dynamo.exc.Unsupported, match=message):
                torch.compile(module, fullgraph=True, backend=dynamo_backend)(x, residual)


@pytest.mark.parametrize("cls,shape", [
    (fused_resnet.nn.BatchNormReLU1d, (6, 8)),
    (fused_resnet.nn.BatchNormReLU2d, (3, 8, 4, 5)),
    (fused_resnet.nn.BatchNormAddReLU3d, (2, 8, 2, 3, 3)),
])
def test_cumulative_average_compiles_fullgraph_and_matches_eager(backend, cls, shape):
    """momentum=None under torch.compile(fullgraph=True): running statistics as eager's, step by
    step (num_batches_tracked 1, 2, 3, 4)."""
    residual = cls is fused_resnet.nn.BatchNormAddReLU3d
    module = cls(8, momentum=None).to(DEVICE).double()
    eager = {2: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](8, momentum=None)
    eager = eager.to(DEVICE).double()
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=dynamo_backend_for(backend))
    for step in range(4):
        x = make_tensor(shape, torch.float64, offset=step)
        r = make_tensor(shape, torch.float64) if residual else None
        out = compiled(x, r) if residual else compiled(x)
        ref = F.relu(eager(x) + r if residual else eager(x))
        assert_close(out, ref, torch.float64, f"output, step {step}")
        assert_close(module.running_mean, eager.running_mean, torch.float64, f"running_mean, step {step}")
        assert_close(module.running_var, eager.running_var, torch.float64, f"running_var, step {step}")
        assert int(module.num_batches_tracked) == int(eager.num_batches_tracked) == step + 1


# ---------------------------------------------------------------------------------------------
# Triton: a call that fails changes no state.


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend for these tensors")
def test_a_triton_training_call_whose_output_cannot_be_allocated_changes_nothing(monkeypatch):
    """The output (and a residual copy) is allocated before the statistics kernel updates the
    running statistics: out of memory there leaves them, and num_batches_tracked, as they were."""
    module = fused_resnet.nn.BatchNormAddReLU2d(4).to(DEVICE)
    x = make_tensor((2, 4, 3, 3), torch.float32)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    empty_like = torch.empty_like

    def out_of_memory(t, *args, **kwargs):
        if t.shape == x.shape:
            raise torch.OutOfMemoryError("test: no memory for an activation")
        return empty_like(t, *args, **kwargs)

    monkeypatch.setattr(torch, "empty_like", out_of_memory)
    with fused_resnet.use_backend("triton"), pytest.raises(torch.OutOfMemoryError):
        module(x, make_tensor(x.shape, torch.float32))
    monkeypatch.undo()
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a call that failed"
