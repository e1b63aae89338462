"""python -m fused_resnet.bench: the fused ops against eager PyTorch and torch.compile, side by side.

For each case (op, shape, layout, dtype, mode) every provider runs in the same process, one after
the other, so the ratios are measured under the same conditions:
  eager     F.relu(F.batch_norm(x, ...) (+ r)), the unfused composition
  compile   torch.compile of that composition
  <backend> fused_resnet.functional with that backend ("cpu", "cuda", "triton", ...)

Bytes counted are the fewest a fused implementation must move through memory:
  eval            read x (and r), write y                                   2 or 3 passes
  train-fwd+bwd   forward: read x (and r), write y; backward: read dy, y, x,
                  write dx (and dr)                                         6 or 8 passes
The achieved rate is also given as a fraction of the device's measured copy bandwidth (a large
tensor copy, counting bytes read plus bytes written).
"""

import argparse
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import fused_resnet

# (shape, layout): ResNet-50 stage outputs and a 3D video shape; CPU sizes are those of the
# CPU performance table in the README, GPU sizes are real training batches.
CPU_CASES = [
    ((8, 256, 56, 56), "contiguous"),
    ((8, 64, 56, 56), "channels_last"),
    ((2, 64, 8, 56, 56), "contiguous"),
]
CPU_QUICK_CASES = [((4, 64, 28, 28), "contiguous"), ((4, 64, 28, 28), "channels_last")]
GPU_CASES = [
    ((64, 256, 56, 56), "contiguous"),
    ((64, 256, 56, 56), "channels_last"),
    ((64, 512, 28, 28), "channels_last"),
    ((64, 1024, 14, 14), "channels_last"),
    ((64, 2048, 7, 7), "channels_last"),
    ((16, 64, 8, 56, 56), "contiguous"),
    ((16, 64, 8, 56, 56), "channels_last"),
]
GPU_QUICK_CASES = GPU_CASES[:2]
OPS = ("bn_relu", "bn_add_relu")
MODES = ("eval", "train-fwd+bwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Result:
    op: str
    shape: tuple
    dtype: str
    layout: str
    mode: str
    provider: str
    ms: float
    gbps: float
    bandwidth_fraction: float
    speedup_vs_eager: float = float("nan")
    speedup_vs_compile: float = float("nan")


def _memory_format(layout, ndim):
    if layout != "channels_last":
        return torch.contiguous_format
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def bytes_moved(op, mode, numel, element_size):
    passes = {"eval": 2, "train-fwd+bwd": 6}[mode]
    if op == "bn_add_relu":
        passes += {"eval": 1, "train-fwd+bwd": 2}[mode]
    return passes * numel * element_size


def _eager_composition(x, r, running_mean, running_var, weight, bias, training):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)
    return F.relu(y + r if r is not None else y)


def _fused_composition(x, r, running_mean, running_var, weight, bias, training):
    f = fused_resnet.functional
    if r is None:
        return f.batch_norm_relu(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)
    return f.batch_norm_add_relu(x, r, running_mean, running_var, weight, bias, training, 0.1, 1e-5)


def make_runner(provider, op, shape, layout, dtype, mode, device):
    """A no-argument callable running one iteration of the case with the provider."""
    fmt = _memory_format(layout, len(shape))
    channels = shape[1]
    param_dtype = torch.float32 if dtype != torch.float64 else dtype
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
    r = torch.randn_like(x) if op == "bn_add_relu" else None
    weight = torch.rand(channels, device=device, dtype=param_dtype) + 0.5
    bias = torch.randn(channels, device=device, dtype=param_dtype)
    running_mean = torch.zeros(channels, device=device, dtype=param_dtype)
    running_var = torch.ones(channels, device=device, dtype=param_dtype)
    training = mode != "eval"

    if provider == "eager":
        fn = _eager_composition
    elif provider == "compile":
        fn = torch.compile(_eager_composition, dynamic=False)
    else:
        backend = provider

        def fn(*args):
            with fused_resnet.use_backend(backend):
                return _fused_composition(*args)

    if not training:

        def run():
            with torch.no_grad():
                return fn(x, r, running_mean, running_var, weight, bias, False)

        return run

    x.requires_grad_(True)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    if r is not None:
        r.requires_grad_(True)
    grad_out = torch.randn_like(x)
    inputs = [t for t in (x, r, weight, bias) if t is not None]

    def run():
        y = fn(x, r, running_mean, running_var, weight, bias, True)
        return torch.autograd.grad(y, inputs, grad_out)

    return run


def time_ms(run, device, min_run_time=0.5):
    """Median milliseconds per call of `run` (already warmed up): CUDA events on a GPU,
    torch.utils.benchmark on the CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def time_side_by_side(runners, device, rounds=3):
    """{provider: ms} for runners of one case, measured in interleaved rounds.

    Each round times every provider once, one after the other, so a burst of noise on a shared
    machine hits one round of all providers rather than all rounds of one; the best round's
    median is kept for each provider. Warm-up (which also triggers torch.compile) comes first.
    """
    for run in runners.values():
        for _ in range(3):
            run()
    best = {name: float("inf") for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            best[name] = min(best[name], time_ms(run, device, min_run_time=0.3))
    return best


def copy_bandwidth_gbps(device):
    """Measured device copy bandwidth: bytes read + bytes written per second, in GB/s."""
    n = (1 << 28) if device.type == "cuda" else (1 << 26)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_side_by_side({"copy": lambda: dst.copy_(src)}, device)["copy"]
    return 2 * n * src.element_size() / (ms * 1e-3) / 1e9


def providers_for(device):
    return ["eager", "compile"] + fused_resnet.available_backends(device)


def run_benchmarks(device, dtype_names, quick, log=print):
    if device.type == "cuda":
        cases = GPU_QUICK_CASES if quick else GPU_CASES
    else:
        cases = CPU_QUICK_CASES if quick else CPU_CASES
    bandwidth = copy_bandwidth_gbps(device)
    log(f"device copy bandwidth: {bandwidth:.1f} GB/s (read + write)")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    results = []
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        for shape, layout in cases:
            for op in OPS:
                for mode in MODES:
                    runners = {
                        provider: make_runner(provider, op, shape, layout, dtype, mode, device)
                        for provider in providers_for(device)
                    }
                    timings = time_side_by_side(runners, device)
                    nbytes = bytes_moved(op, mode, math.prod(shape), torch.finfo(dtype).bits // 8)
                    case = []
                    for provider, ms in timings.items():
                        gbps = nbytes / (ms * 1e-3) / 1e9
                        case.append(Result(op, shape, dtype_name, layout, mode, provider, ms, gbps, gbps / bandwidth))
                    by_provider = {r.provider: r.ms for r in case}
                    for r in case:
                        r.speedup_vs_eager = by_provider["eager"] / r.ms
                        r.speedup_vs_compile = by_provider["compile"] / r.ms
                    results.extend(case)
                    log(format_table(case, header=False))
    return bandwidth, results


def format_table(results, header=True):
    cols = "{:<12} {:<20} {:<5} {:<14} {:<14} {:<10} {:>9} {:>8} {:>6} {:>8} {:>8}"
    lines = []
    if header:
        lines.append(cols.format("op", "shape", "dtype", "layout", "mode", "provider", "ms", "GB/s", "%bw", "vs eager", "vs comp"))
    for r in results:
        lines.append(
            cols.format(
                r.op, "x".join(map(str, r.shape)), r.dtype, r.layout, r.mode, r.provider,
                f"{r.ms:.3f}", f"{r.gbps:.1f}", f"{100 * r.bandwidth_fraction:.0f}",
                f"{r.speedup_vs_eager:.2f}x", f"{r.speedup_vs_compile:.2f}x",
            )
        )
    return "\n".join(lines)


def environment(device):
    info = {"torch": torch.__version__, "python": platform.python_version(), "fused_resnet": fused_resnet.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        try:
            with open("/proc/cpuinfo") as f:
                model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
            name = f"CPU: {model}, {torch.get_num_threads()} threads"
        except (OSError, StopIteration):
            pass
    return name, info


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fused_resnet.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="comma-separated: fp32,fp16,bf16 (default: fp32 on CPU, bf16,fp32 on GPU)")
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke run")
    parser.add_argument("--output", default=None, help="directory for results.json")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype_names = (args.dtype or ("bf16,fp32" if device.type == "cuda" else "fp32")).split(",")
    for name in dtype_names:
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    device_name, versions = environment(device)
    print(f"fused_resnet.bench on {device_name}; torch {versions['torch']}, triton {versions['triton']}")
    print(format_table([], header=True))
    bandwidth, results = run_benchmarks(device, dtype_names, args.quick)
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        payload = {
            "device": device_name,
            "versions": versions,
            "command": " ".join([os.path.basename(sys.executable), "-m", "fused_resnet.bench"] + (argv if argv is not None else sys.argv[1:])),
            "copy_bandwidth_gbps": bandwidth,
            "results": [asdict(r) for r in results],
        }
        path = os.path.join(args.output, "results.json")
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
