"""The smoke test benchmarks/compat.sh runs against each torch release: python compat_smoke.py cpu|cuda

Checks, on CPU tensors (no GPU is needed), that the extension built against this torch loads and
computes: the C++ kernels are registered (and the CUDA kernels too, for a "cuda" build), a fused
module's training step and eval forward match the float64 eager composition, and
torch.library.opcheck accepts the training op. Prints one line per check; exits 1 on any failure.
"""

import sys

import torch
from torch import nn

import fused_resnet


def check(name, passed, detail=""):
    print(f"{'ok  ' if passed else 'FAIL'} {name}{': ' + detail if detail else ''}")
    return passed


def max_error(actual, expected):
    return float((actual.detach().double() - expected.detach().double()).abs().max())


def training_step_matches_eager(memory_format, dtype, tolerance):
    """One training step of BatchNormAddReLU2d against nn.BatchNorm2d + add + ReLU in float64:
    output, input/residual/parameter gradients and running statistics."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 9, dtype=dtype).contiguous(memory_format=memory_format)
    r = torch.randn_like(x)
    dy = torch.randn_like(x)
    fused = fused_resnet.nn.BatchNormAddReLU2d(5).to(dtype)
    eager = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        fused.weight.uniform_(-1.5, 1.5)
        fused.bias.normal_()
        eager.weight.copy_(fused.weight)
        eager.bias.copy_(fused.bias)
    xf, rf = x.clone().requires_grad_(), r.clone().requires_grad_()
    xe, re_ = x.double().requires_grad_(), r.double().requires_grad_()
    out = fused(xf, rf)
    expected = torch.relu(eager(xe) + re_)
    out.backward(dy)
    expected.backward(dy.double())
    pairs = {
        "out": (out, expected),
        "grad_input": (xf.grad, xe.grad),
        "grad_residual": (rf.grad, re_.grad),
        "grad_weight": (fused.weight.grad, eager.weight.grad),
        "grad_bias": (fused.bias.grad, eager.bias.grad),
        "running_mean": (fused.running_mean, eager.running_mean),
        "running_var": (fused.running_var, eager.running_var),
    }
    errors = {k: max_error(a, e) for k, (a, e) in pairs.items()}
    worst = max(errors, key=errors.get)
    return errors[worst] <= tolerance, f"largest error {errors[worst]:.1e} ({worst}), tolerance {tolerance:.0e}"


def eval_matches_eager():
    torch.manual_seed(1)
    x = torch.randn(4, 6, 5, 5)
    fused = fused_resnet.nn.BatchNormReLU2d(6).eval()
    with torch.no_grad():
        fused.running_mean.normal_()
        fused.running_var.uniform_(0.5, 2.0)
    expected = torch.relu(nn.functional.batch_norm(
        x.double(), fused.running_mean.double(), fused.running_var.double(), eps=fused.eps))
    error = max_error(fused(x), expected)
    return error <= 1e-5, f"largest error {error:.1e}"


def opcheck_training_op():
    x = torch.randn(2, 3, 4, 4)
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)
    torch.library.opcheck(
        torch.ops.fused_resnet._bn_act_fwd_train.default, (x, torch.randn_like(x), weight, bias, 1e-5),
        test_utils=("test_schema", "test_faketensor"),
    )
    return True, ""


def main(build):
    ok = check("torch", True, f"{torch.__version__} (CUDA {torch.version.cuda}), Python {sys.version.split()[0]}")
    ok &= check("extension loads", fused_resnet.EXTENSION_ERROR is None, str(fused_resnet.EXTENSION_ERROR or ""))
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    ok &= check("CPU kernels registered", has("fused_resnet::_bn_act_fwd_train", "CPU"))
    cuda_registered = has("fused_resnet::_bn_act_fwd_train", "CUDA")
    ok &= check(f"CUDA kernels {'registered' if build == 'cuda' else 'absent'}", cuda_registered == (build == "cuda"))
    with fused_resnet.use_backend("cpu"):
        ok &= check("training step, NCHW float64", *training_step_matches_eager(torch.contiguous_format, torch.float64, 1e-10))
        ok &= check("training step, channels_last float32", *training_step_matches_eager(torch.channels_last, torch.float32, 1e-4))
        ok &= check("eval forward, float32", *eval_matches_eager())
        ok &= check("opcheck bn_act_fwd_train", *opcheck_training_op())
    print("compat smoke:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("cpu", "cuda"):
        sys.exit("usage: python benchmarks/compat_smoke.py cpu|cuda   (the kind of build to expect)")
    sys.exit(main(sys.argv[1]))
