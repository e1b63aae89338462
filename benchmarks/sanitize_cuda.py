"""A small case of every CUDA kernel path of fused_resnet, to run under compute-sanitizer:

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool synccheck python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool initcheck python benchmarks/sanitize_cuda.py

Each of the six ops runs on each layout path (planes / rows, 16-byte / scalar accesses, several
column tiles, channels split over several blocks), in float32, bfloat16 and float64, with and
without a residual, and its results are compared with the reference backend, so that a run under
the sanitizer also shows the kernels computing the right thing. Exits non-zero on a mismatch.
"""

import sys

import torch

import fused_resnet
from fused_resnet.contract import op_set_of
from fused_resnet import reference

CASES = [
    # (shape, memory format): the path it takes
    ((3, 4, 8, 8), torch.contiguous_format),  # planes, 16-byte accesses
    ((2, 3, 5, 7), torch.contiguous_format),  # planes, scalar; apply passes flat, with a tail
    ((2, 16, 4, 4), torch.channels_last),  # rows, 16-byte accesses
    ((2, 5, 3, 3), torch.channels_last),  # rows, scalar
    ((3, 288, 2, 2), torch.channels_last),  # rows, several column tiles
    ((9, 6), torch.contiguous_format),  # rows (S == 1)
    ((16, 2, 32, 32), torch.contiguous_format),  # planes, each channel over several blocks
    ((32, 8, 16, 16), torch.channels_last),  # rows, several row blocks
]
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float64: 1e-8}


def _check(name, actual, expected, dtype):
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    scale = 1.0 + expected.double().abs().max().item() if expected.numel() else 1.0
    if not err <= TOLERANCE[dtype] * scale:
        raise AssertionError(f"{name}: max error {err:g} (dtype {dtype})")


def run_case(shape, memory_format, dtype, residual):
    cxx_ops = op_set_of(torch.ops.fused_resnet)
    device = "cuda"
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype

    def act():
        return torch.randn(shape, device=device).to(dtype).contiguous(memory_format=memory_format)

    x, dy = act(), act()
    r = act() if residual else None
    c = shape[1]
    w = torch.rand(c, device=device, dtype=param_dtype) + 0.5
    b = torch.randn(c, device=device, dtype=param_dtype)
    rm, rv = torch.randn(c, device=device, dtype=param_dtype), torch.rand(c, device=device, dtype=param_dtype) + 0.5
    what = f"{tuple(shape)} {memory_format} {dtype} residual={residual}"

    out, mean, invstd, var, act_mask = cxx_ops.bn_act_fwd_train(x, r, w, b, 1e-5)
    ref = reference.bn_act_fwd_train(x, r, w, b, 1e-5)
    for name, mine, theirs in zip(("out", "mean", "invstd", "var"), (out, mean, invstd, var), ref):
        _check(f"{what}: bn_act_fwd_train {name}", mine, theirs, dtype)
    _check(f"{what}: bn_act_fwd_eval", cxx_ops.bn_act_fwd_eval(x, r, rm, rv, w, b, 1e-5),
           reference.bn_act_fwd_eval(x, r, rm, rv, w, b, 1e-5), dtype)

    sdx, sdz = cxx_ops.bn_act_bwd_reduce(dy, out, x, mean, invstd)
    ref_sdx, ref_sdz = reference.bn_act_bwd_reduce(dy, out, x, mean, invstd)
    _check(f"{what}: bn_act_bwd_reduce sum_dz_xhat", sdx, ref_sdx, dtype)
    _check(f"{what}: bn_act_bwd_reduce sum_dz", sdz, ref_sdz, dtype)
    m = x.numel() // c
    for residual_grad in (True, False):
        dx, dr = cxx_ops.bn_act_bwd_apply(dy, out, x, w, mean, invstd, sdz / m, sdx / m, residual_grad)
        ref_dx, _ = reference.bn_act_bwd_apply(dy, out, x, w, mean, invstd, sdz / m, sdx / m, residual_grad)
        _check(f"{what}: bn_act_bwd_apply grad_input", dx, ref_dx, dtype)
        for batch_stats in (True, False):
            dx2, dr2, gw, gb = cxx_ops.bn_act_bwd(dy, out, act_mask, x, w, mean, invstd, batch_stats, residual_grad)
            if batch_stats:
                _check(f"{what}: bn_act_bwd grad_input", dx2, ref_dx, dtype)
            _check(f"{what}: bn_act_bwd grad_weight", gw, ref_sdx, dtype)
            _check(f"{what}: bn_act_bwd grad_bias", gb, ref_sdz, dtype)
            if residual_grad:
                _check(f"{what}: bn_act_bwd grad_residual", dr2, dr, dtype)

    s_mean, s_var = cxx_ops.bn_stats(x)
    _check(f"{what}: bn_stats mean", s_mean, ref[1], dtype)
    _check(f"{what}: bn_stats var", s_var, ref[3], dtype)


def main():
    if not torch.cuda.is_available() or "cuda" not in fused_resnet.available_backends("cuda"):
        print("sanitize_cuda: needs a GPU and fused_resnet._C built with CUDA", file=sys.stderr)
        return 2
    count = 0
    for shape, memory_format in CASES:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for residual in (False, True):
                run_case(shape, memory_format, dtype, residual)
                count += 1
    torch.cuda.synchronize()
    print(f"sanitize_cuda: {count} cases ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
