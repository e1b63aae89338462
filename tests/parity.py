"""Two models that must compute the same thing, compared step by step.

`assert_same_training` runs both on the same inputs for a few SGD steps and compares, at every
step, the outputs, the gradient of the input and of every parameter, every buffer (running
statistics, num_batches_tracked), and the parameters after the optimizer step, by qualified name.
"""

import torch

from helpers import TOLERANCES

# Through a whole model the rounding errors of every layer add up (training-mode BatchNorm
# backward subtracts means and so amplifies them) and scale with the tensor's largest value, not
# with each element. Model outputs, gradients and states are therefore compared relative to their
# largest magnitude, with the table's tolerance widened by this factor.
MODEL_ERROR_GROWTH = 100.0


_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def randomize_norms(model):
    """Give every BatchNorm, and every frozen BatchNorm (torchvision's, timm's, this package's:
    those four buffers and no parameters), weights, biases and running statistics away from their
    defaults, so that eval mode and the affine part are tested too."""
    with torch.no_grad():
        for m in model.modules():
            if (isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None) or _is_frozen_norm(m):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.5)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _is_frozen_norm(module):
    return not isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and all(
        isinstance(module._buffers.get(name), torch.Tensor) for name in _FROZEN_BUFFERS
    )


@torch.no_grad()
def calibrate_frozen(model, x):
    """Give every frozen BatchNorm of `model` the statistics of its own input when the model
    runs on `x`, layer after layer, as a trained model's are: random statistics leave a deep
    frozen ResNet's activations growing block after block until they overflow. Returns `model`."""

    def take_statistics(module, args):
        dims = [0] + list(range(2, args[0].dim()))
        module.running_mean.copy_(args[0].mean(dims))
        module.running_var.copy_(args[0].var(dims))

    handles = [m.register_forward_pre_hook(take_statistics) for m in model.modules() if _is_frozen_norm(m)]
    if not handles:
        return model
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return model


def assert_close_at_scale(actual, expected, dtype, what):
    """The table's tolerances, widened by MODEL_ERROR_GROWTH, relative to the largest magnitude of
    `expected` (helpers.assert_close compares element by element)."""
    atol, rtol = TOLERANCES[dtype]
    scale = max(expected.detach().abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().double() / scale,
        expected.detach().double() / scale,
        atol=atol * MODEL_ERROR_GROWTH,
        rtol=rtol * MODEL_ERROR_GROWTH,
        msg=lambda m: f"{what} (relative to its largest value {scale:.3g}): {m}",
    )


def clone_input(x):
    return x.detach().clone().requires_grad_(x.requires_grad)


def assert_same_state(model, reference, dtype, what):
    params, ref_params = dict(model.named_parameters()), dict(reference.named_parameters())
    assert params.keys() == ref_params.keys(), f"{what}: parameter names differ"
    for name, p in params.items():
        assert_close_at_scale(p, ref_params[name], dtype, f"{what}: {name}")
    buffers, ref_buffers = dict(model.named_buffers()), dict(reference.named_buffers())
    assert buffers.keys() == ref_buffers.keys(), f"{what}: buffer names differ"
    for name, b in buffers.items():
        if b.dtype.is_floating_point:
            assert_close_at_scale(b, ref_buffers[name], dtype, f"{what}: {name}")
        else:
            assert torch.equal(b, ref_buffers[name]), f"{what}: {name}"


def assert_same_training(model, reference, make_input, dtype, steps=3, lr=0.05, training=True):
    """Train (or, with training=False, run in eval mode and still step the optimizer) `model` and
    `reference` side by side; they must start with the same state."""
    model.train(training)
    reference.train(training)
    assert_same_state(model, reference, dtype, "initial state")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=lr, momentum=0.9)
    for step in range(steps):
        x = make_input().requires_grad_()
        x_ref = clone_input(x)
        out, ref_out = model(x), reference(x_ref)
        assert_close_at_scale(out, ref_out, dtype, f"step {step}: output")
        grad_out = torch.randn_like(ref_out)
        opt.zero_grad()
        ref_opt.zero_grad()
        out.backward(grad_out)
        ref_out.backward(grad_out)
        assert_close_at_scale(x.grad, x_ref.grad, dtype, f"step {step}: grad of input")
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}
        for name, p in model.named_parameters():
            assert (p.grad is None) == (ref_grads[name] is None), f"step {step}: grad of {name}"
            if p.grad is not None:
                assert_close_at_scale(p.grad, ref_grads[name], dtype, f"step {step}: grad of {name}")
        opt.step()
        ref_opt.step()
        assert_same_state(model, reference, dtype, f"after step {step}")
