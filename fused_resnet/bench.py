"""python -m fused_resnet.bench: the fused ops against eager PyTorch and torch.compile, side by side.

For each case every provider runs in the same process, interleaved round by round, so the ratios
are measured under the same conditions:
  eager     F.relu(F.batch_norm(x, ...) (+ r)), the unfused composition
  compile   torch.compile of that composition
  <backend> fused_resnet.functional with that backend ("cpu", "cuda", "triton")
Model-level cases run whole ResNets (fused_resnet.models): "eager" is the plain model, "fused" its
fused twin on the same weights, and "compile" / "fused+compile" the two under torch.compile.

Bytes counted are the fewest a fused implementation must move through memory (x, r, y, dy, dx,
dr each once; statistics and parameters are negligible):
  eval            read x (and r), write y                                   2 or 3 passes
  train-fwd       read x (and r), write y                                   2 or 3 passes
  train-fwd+bwd   forward as above; backward: read dy, y, x, write dx (and dr)  6 or 8 passes
GB/s is those bytes over the median time; "%bw" divides it by the device's copy bandwidth,
measured once per run with a large tensor copy (bytes read + bytes written per second). A fused
training forward that reads x twice (statistics, then apply) tops out near 2/3 of that.
"""

import argparse
import contextlib
import ctypes
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

import fused_resnet

from . import bench_overhead
from .bench_report import ResultsFile, format_model_table, format_table, plot

OPS = ("bn_relu", "bn_add_relu")
MODES = ("eval", "train-fwd", "train-fwd+bwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (shape, layout). GPU: the ResNet-50 stage outputs at batch 64 and a video shape. CPU: the same
# stages at batch sizes this machine runs in seconds.
GPU_CASES = [
    (shape, layout)
    for shape in [(64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7), (16, 64, 8, 56, 56)]
    for layout in ("contiguous", "channels_last")
]
GPU_QUICK_CASES = [((64, 256, 56, 56), "contiguous"), ((64, 256, 56, 56), "channels_last")]
CPU_CASES = [
    ((8, 256, 56, 56), "contiguous"),
    ((8, 64, 56, 56), "channels_last"),
    ((8, 1024, 14, 14), "channels_last"),
    ((2, 64, 8, 56, 56), "contiguous"),
]
CPU_QUICK_CASES = [((4, 64, 28, 28), "contiguous"), ((4, 64, 28, 28), "channels_last")]

# (model builder in fused_resnet.models, input shape). Images for 2D models, clips for 3D ones.
# On a CPU, compiling the models dominates the run (torch.compile of one ResNet-50 training step
# took 8 minutes on a shared 2-core machine), so the CPU cases are the 18-layer twins.
GPU_MODEL_CASES = [("resnet50", (128, 3, 224, 224)), ("resnet3d_50", (8, 3, 16, 112, 112))]
CPU_MODEL_CASES = [("resnet18", (4, 3, 64, 64)), ("resnet3d_18", (2, 3, 4, 48, 48))]
CPU_QUICK_MODEL_CASES = [("resnet50", (2, 3, 32, 32))]
MODEL_MODES = ("eval", "train")
MODEL_PROVIDERS = ("eager", "fused", "compile", "fused+compile")


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
    peak_memory_bytes: Optional[int] = 0  # None when the provider failed
    speedup_vs_eager: float = float("nan")
    speedup_vs_compile: float = float("nan")
    error: str = ""  # "ExceptionType: first line" when the provider failed; its numbers are NaN


@dataclass
class ModelResult:
    model: str
    input_shape: tuple
    dtype: str
    layout: str
    mode: str
    provider: str
    ms: float
    items_per_s: float
    peak_memory_bytes: Optional[int] = 0  # None when the provider failed
    speedup_vs_eager: float = float("nan")
    speedup_vs_compile: float = float("nan")
    note: str = field(default="")
    error: str = ""  # as in Result


def memory_format(layout, ndim):
    if layout != "channels_last":
        return torch.contiguous_format
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def bytes_moved(op, mode, numel, element_size):
    passes = {"eval": 2, "train-fwd": 2, "train-fwd+bwd": 6}[mode]
    if op == "bn_add_relu":
        passes += {"eval": 1, "train-fwd": 1, "train-fwd+bwd": 2}[mode]
    return passes * numel * element_size


def fused_providers(device):
    """Fused backends worth timing on `device`: not the eager "reference", and not Triton's CPU
    interpreter (a correctness tool, orders of magnitude slower than a kernel)."""
    device = torch.device(device)
    return [
        name
        for name in fused_resnet.available_backends(device)
        if name != "reference" and not (name == "triton" and device.type == "cpu")
    ]


def providers_for(device):
    return ["eager", "compile"] + fused_providers(device)


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


def input_set_count(footprint_bytes, device):
    """How many input sets to rotate so that a call does not find its inputs in the cache."""
    return max(1, min(16, math.ceil(2 * cache_bytes(device) / max(footprint_bytes, 1))))


# ---------------------------------------------------------------------------------------------
# Op-level runners.


def _eager_composition(x, r, running_mean, running_var, weight, bias, training):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)
    return F.relu(y + r if r is not None else y)


def _fused_composition(x, r, running_mean, running_var, weight, bias, training):
    f = fused_resnet.functional
    if r is None:
        return f.batch_norm_relu(x, running_mean, running_var, weight, bias, training, 0.1, 1e-5)
    return f.batch_norm_add_relu(x, r, running_mean, running_var, weight, bias, training, 0.1, 1e-5)


def _op_function(provider):
    if provider == "eager":
        return _eager_composition
    if provider == "compile":
        return torch.compile(_eager_composition, dynamic=False)

    def fused(*args):
        with fused_resnet.use_backend(provider):
            return _fused_composition(*args)

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
    footprint = bytes_moved(op, mode, math.prod(shape), torch.finfo(dtype).bits // 8)
    n_sets = input_set_count(footprint, device) if rotate else 1

    def input_set():
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        r = torch.randn_like(x) if op == "bn_add_relu" else None
        stats = (torch.zeros(channels, device=device, dtype=param_dtype), torch.ones(channels, device=device, dtype=param_dtype))
        grad_out = torch.randn_like(x) if mode == "train-fwd+bwd" else None
        if training:
            x.requires_grad_(True)
            if r is not None:
                r.requires_grad_(True)
        return x, r, stats, grad_out

    sets = [input_set() for _ in range(n_sets)]
    fn = _op_function(provider)
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


# ---------------------------------------------------------------------------------------------
# Model-level runners.


def _autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_model_runner(provider, model_name, input_shape, mode, device, dtype, layout):
    """One inference batch ("eval") or one SGD training step ("train") of the model."""
    from . import models

    device = torch.device(device)
    torch.manual_seed(0)
    num_classes = 1000 if device.type == "cuda" else 10
    fused = provider in ("fused", "fused+compile")
    model = getattr(models, model_name)(num_classes=num_classes, fused=fused).to(device)
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

    def run():
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = F.cross_entropy(forward(x), target)
        loss.backward()
        optimizer.step()
        return loss

    return run


# ---------------------------------------------------------------------------------------------
# Timing and memory.


def time_ms(run, device, min_run_time=0.5):
    """Median milliseconds per call of `run` (already warmed up): triton.testing.do_bench
    (CUDA events around each call, L2 flushed in between) on a GPU, torch.utils.benchmark on the
    CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def describe_failure(exc):
    """What a failed row records: the exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def time_side_by_side(runners, device, rounds=3, min_run_time=0.3, errors=None, per_call=False):
    """{provider: ms} for runners of one case, measured in interleaved rounds.

    Each round times every provider once, one after the other, so a burst of noise on a shared
    machine hits one round of all providers rather than all rounds of one; the best round's
    median is kept for each provider. Warm-up (which also triggers torch.compile) comes first.

    per_call=True (CPU model steps, 20-600 ms each): the providers take turns call by call, for
    at least `rounds` calls each and `min_run_time` seconds in all, and each provider's median
    call is kept: on a shared machine the speed drifts by ±10% over seconds, which blocks of a
    second per provider would turn into differences between providers.

    With an `errors` dict, a provider that raises (an Exception, not a KeyboardInterrupt) gets
    its describe_failure there and is left out of the rest and of the result; without one, the
    exception propagates.
    """
    live = dict(runners)

    def attempt(name, call):
        if errors is None:
            return call()
        try:
            return call()
        except Exception as e:
            errors[name] = describe_failure(e)
            del live[name]
            return None

    def warm_up(run):
        for _ in range(3):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for name, run in list(live.items()):
        attempt(name, lambda: warm_up(run))
    if per_call:
        return _time_calls_in_turn(live, attempt, rounds, min_run_time)
    best = {}
    for _ in range(rounds):
        for name, run in list(live.items()):
            ms = attempt(name, lambda: time_ms(run, device, min_run_time=min_run_time))
            if ms is not None:
                best[name] = min(best.get(name, float("inf")), ms)
    return {name: best[name] for name in live}


def _time_calls_in_turn(live, attempt, min_calls, min_seconds):
    """{provider: median ms of one call}, the providers called in turn (time_side_by_side)."""
    samples = {name: [] for name in live}
    start = time.perf_counter()
    while live and (
        min(len(samples[n]) for n in live) < min_calls or time.perf_counter() - start < min_seconds
    ):
        for name, run in list(live.items()):
            begin = time.perf_counter()
            attempt(name, run)
            if name in live:  # (a provider that raised has left)
                samples[name].append((time.perf_counter() - begin) * 1e3)
    return {name: statistics.median(samples[name]) for name in live}


@contextlib.contextmanager
def _native_output_dropped():
    """Within: file descriptors 1 and 2 point at /dev/null. The profiler's native side writes
    straight to them, past sys.stdout: kineto's start/stop lines ("USDT: ... profiler_start"), the
    allocator's warning about blocks allocated before profiling started."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # what C stdio still buffers goes to /dev/null too
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def peak_memory_bytes(run, device):
    """Memory allocated at the peak of one call of `run`, above what was allocated before it.

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocation events
    ("Total Allocated" of its [memory] records), which follow every CPU tensor allocation. What
    the profiled call writes to file descriptors 1 and 2 is dropped with the profiler's own
    messages (`run` was warmed up, so it has shown anything it had to say).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with _native_output_dropped(), tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    if not totals:
        return 0
    first = next(e for e in events if e.get("name") == "[memory]")
    baseline = first["args"]["Total Allocated"] - first["args"]["Bytes"]
    return max(totals) - baseline


def copy_bandwidth_gbps(device):
    """Measured device copy bandwidth: bytes read + bytes written per second, in GB/s."""
    n = (1 << 28) if device.type == "cuda" else (1 << 26)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_side_by_side({"copy": lambda: dst.copy_(src)}, device)["copy"]
    return 2 * n * src.element_size() / (ms * 1e-3) / 1e9


def measure(make_runner_for, providers, device, rounds, min_run_time, per_call=False):
    """({provider: (ms, peak bytes)}, {provider: failure}) of one case.

    A provider whose runner raises while it is built, warmed up, timed or measured for memory is
    in the second dict, with describe_failure's text, and not in the first; the others go on.
    """
    runners, errors = {}, {}
    for provider in providers:
        try:
            runners[provider] = make_runner_for(provider)
        except Exception as e:
            errors[provider] = describe_failure(e)
    timings = time_side_by_side(
        runners, device, rounds=rounds, min_run_time=min_run_time, errors=errors, per_call=per_call
    )
    measured = {}
    for provider, ms in timings.items():
        try:
            measured[provider] = (ms, peak_memory_bytes(runners[provider], device))
        except Exception as e:
            errors[provider] = describe_failure(e)
    return measured, errors


def _with_speedups(case):
    """Speed-ups over eager and over compile, between rows that were measured (NaN otherwise)."""
    by_provider = {r.provider: r.ms for r in case if not r.error}
    nan = float("nan")
    for r in case:
        if r.error:
            continue
        r.speedup_vs_eager = by_provider["eager"] / r.ms if "eager" in by_provider else nan
        r.speedup_vs_compile = by_provider["compile"] / r.ms if "compile" in by_provider else nan
    return case


# ---------------------------------------------------------------------------------------------
# The runs.


def case_label(dtype_name, shape, layout, op, mode):
    """The text --cases matches, e.g. "bn_add_relu train-fwd+bwd 64x256x56x56 channels_last bf16"."""
    return f"{op} {mode} {'x'.join(map(str, shape))} {layout} {dtype_name}"


def op_cases(device, dtype_names, quick, modes=MODES, pattern=None):
    """Op-level cases, optionally only `modes` and those whose case_label matches the regex `pattern`."""
    if device.type == "cuda":
        cases = GPU_QUICK_CASES if quick else GPU_CASES
    else:
        cases = CPU_QUICK_CASES if quick else CPU_CASES
    todo = [
        (dtype_name, shape, layout, op, mode)
        for dtype_name in dtype_names
        for shape, layout in cases
        for op in OPS
        for mode in modes
    ]
    if pattern is not None:
        todo = [case for case in todo if re.search(pattern, case_label(*case))]
    return todo


def model_cases(device, dtype_names, quick):
    if device.type == "cuda":
        cases = GPU_MODEL_CASES[:1] if quick else GPU_MODEL_CASES
        # A GPU trains in reduced precision and channels_last: the setting the goals are set for.
        dtype_name = next((d for d in dtype_names if d != "fp32"), dtype_names[0])
        layout = "channels_last"
    else:
        cases = CPU_QUICK_MODEL_CASES if quick else CPU_MODEL_CASES
        dtype_name, layout = "fp32", "contiguous"
    return [(name, shape, dtype_name, layout, mode) for name, shape in cases for mode in MODEL_MODES]


def model_providers(device, quick):
    # torch.compile of a whole ResNet takes minutes on a small CPU: a quick CPU run leaves it out.
    if quick and device.type == "cpu":
        return ("eager", "fused")
    return MODEL_PROVIDERS


def run_op_case(device, bandwidth, dtype_name, shape, layout, op, mode, rounds, min_run_time, providers=None):
    """Rows of one op-level case for `providers` (default: providers_for(device))."""
    dtype = DTYPES[dtype_name]
    providers = providers_for(device) if providers is None else providers
    measured, errors = measure(
        lambda p: make_runner(p, op, shape, layout, dtype, mode, device), providers, device, rounds, min_run_time
    )
    nbytes = bytes_moved(op, mode, math.prod(shape), torch.finfo(dtype).bits // 8)
    nan = float("nan")
    case = []
    for provider in providers:
        if provider in errors:
            case.append(Result(op, shape, dtype_name, layout, mode, provider, nan, nan, nan, None, error=errors[provider]))
            continue
        ms, peak = measured[provider]
        gbps = nbytes / (ms * 1e-3) / 1e9
        case.append(Result(op, shape, dtype_name, layout, mode, provider, ms, gbps, gbps / bandwidth, peak))
    return _with_speedups(case)


def run_model_case(device, providers, name, shape, dtype_name, layout, mode, rounds, min_run_time, per_call=False):
    dtype = DTYPES[dtype_name]
    measured, errors = measure(
        lambda p: make_model_runner(p, name, shape, mode, device, dtype, layout), providers, device, rounds,
        min_run_time, per_call,
    )
    nan = float("nan")
    case = []
    for provider in providers:
        if provider in errors:
            case.append(ModelResult(name, shape, dtype_name, layout, mode, provider, nan, nan, None, error=errors[provider]))
            continue
        ms, peak = measured[provider]
        case.append(ModelResult(name, shape, dtype_name, layout, mode, provider, ms, shape[0] / (ms * 1e-3), peak))
    return _with_speedups(case)


def run_cases(results, device, bandwidth, ops_todo, models_todo, op_providers, providers, rounds, min_run_time,
              model_timing=None):
    """Run the cases in order, op-level ones with `op_providers`, models with `providers`; print
    each case's rows and add them to `results` (a ResultsFile) as it ends. model_timing: (rounds,
    min_run_time) of the model cases, if not the op cases'. Returns (op rows, model rows)."""
    total = len(ops_todo) + len(models_todo)
    op_results, model_results = [], []
    # Each case compiles for its own shapes, and a compiled program is timed at the shapes it was
    # compiled for: a recompile stays static (the 2D and 3D models share ResNet.forward, whose
    # recompile for a new rank would otherwise turn dynamic), and one code object may hold as many
    # compiled versions as there are cases.
    limit = max(torch._dynamo.config.cache_size_limit, 256)
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False, cache_size_limit=limit):
        for k, case in enumerate(ops_todo, 1):
            rows = run_op_case(device, bandwidth, *case, rounds=rounds, min_run_time=min_run_time, providers=op_providers)
            op_results.extend(rows)
            results.add("results", rows)
            print(format_table(rows, header=k == 1, progress=f"[{k}/{total}]"), flush=True)
        model_rounds, model_min_run_time, per_call = model_timing or (rounds, min_run_time, False)
        for k, case in enumerate(models_todo, len(ops_todo) + 1):
            rows = run_model_case(
                device, providers, *case, rounds=model_rounds, min_run_time=model_min_run_time, per_call=per_call
            )
            model_results.extend(rows)
            results.add("model_results", rows)
            print(format_model_table(rows, header=k == len(ops_todo) + 1, progress=f"[{k}/{total}]"), flush=True)
    return op_results, model_results


def environment(device):
    info = {"torch": torch.__version__, "python": platform.python_version(), "fused_resnet": fused_resnet.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        return torch.cuda.get_device_name(device), info
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {name}, {torch.get_num_threads()} threads", info


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fused_resnet.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="comma-separated: fp32,fp16,bf16 (default: fp32 on CPU, bf16,fp16,fp32 on GPU)")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller cases: a smoke run")
    parser.add_argument("--skip-models", action="store_true", help="op-level cases only")
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated op-level modes (default: {','.join(MODES)})"
    )
    parser.add_argument(
        "--cases",
        default=None,
        metavar="REGEX",
        help='only the op-level cases whose label matches, e.g. "channels_last" or "bn_relu eval 64x256"; '
        'a label reads "OP MODE SHAPE LAYOUT DTYPE" (to split a long GPU run across calls)',
    )
    parser.add_argument(
        "--providers",
        default=None,
        metavar="LIST",
        help="comma-separated op-level providers, of eager, compile and the fused backends (default: "
        "every one the device runs); those the device cannot run are left out, with a note",
    )
    parser.add_argument(
        "--overhead", action="store_true",
        help="only the host time per module call, fused against eager, on tiny tensors (overhead.json)",
    )
    parser.add_argument(
        "--output", default="bench-out", metavar="DIR",
        help="directory for results.json (rewritten after every case) and speedup.png (default: bench-out)",
    )
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    device = torch.device(args.device)
    dtype_names = (args.dtype or ("bf16,fp16,fp32" if device.type == "cuda" else "fp32")).split(",")
    for name in dtype_names:
        if name not in DTYPES:
            parser.error(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if args.cases is not None:
        try:
            re.compile(args.cases)
        except re.error as e:
            parser.error(f"--cases {args.cases!r} is not a regular expression: {e}")

    op_providers = providers_for(device)
    if args.providers is not None:
        named = args.providers.split(",")
        known = ("eager", "compile") + tuple(b for b in fused_resnet.backend.BACKEND_NAMES if b != "auto")
        unknown = [p for p in named if p not in known]
        if unknown:
            parser.error(f"unknown provider(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        left_out = [p for p in named if p not in op_providers]
        if left_out:
            print(f"--providers: {', '.join(left_out)} left out: this device runs {', '.join(op_providers)}", flush=True)
        op_providers = [p for p in op_providers if p in named]

    device_name, versions = environment(device)
    command = " ".join(["python", "-m", "fused_resnet.bench"] + list(argv))
    print(f"fused_resnet.bench on {device_name}; torch {versions['torch']}, triton {versions['triton']}", flush=True)
    if args.overhead:
        rows = bench_overhead.run(device, rounds=3 if args.quick else 7, number=50 if args.quick else 200)
        os.makedirs(args.output, exist_ok=True)
        path = os.path.join(args.output, "overhead.json")
        with open(path, "w") as f:
            json.dump({"device": device_name, "versions": versions, "command": command, "rows": rows}, f, indent=1)
        print(f"wrote {path}", flush=True)
        return
    rounds, min_run_time = (2, 0.2) if args.quick else (3, 0.3)
    # A CPU step of a whole model takes 20-600 ms, so a round of 0.3 s holds a step or two, and
    # the machine's drift decides the row: the model providers take turns step by step instead,
    # at least 15 steps each and 20 s in all, and each keeps its median step.
    model_timing = (15, 20.0, True) if device.type == "cpu" and not args.quick else None
    bandwidth = copy_bandwidth_gbps(device)
    print(f"device copy bandwidth: {bandwidth:.1f} GB/s (read + write)", flush=True)
    png = os.path.join(args.output, "speedup.png")
    if os.path.exists(png):
        os.remove(png)  # a run cut off must not leave the plot of an earlier run beside its rows
    results = ResultsFile(
        args.output, {"device": device_name, "versions": versions, "command": command, "copy_bandwidth_gbps": bandwidth}
    )
    print(f"rows go to {results.path} as each case ends", flush=True)

    ops_todo = op_cases(device, dtype_names, args.quick, modes, args.cases)
    models_todo = [] if args.skip_models else model_cases(device, dtype_names, args.quick)
    start = time.monotonic()
    try:
        op_results, model_results = run_cases(
            results, device, bandwidth, ops_todo, models_todo, op_providers, model_providers(device, args.quick),
            rounds, min_run_time, model_timing,
        )
    except KeyboardInterrupt:
        print(f"interrupted: the finished cases are in {results.path}", file=sys.stderr, flush=True)
        raise
    results.finish()
    minutes, seconds = divmod(round(time.monotonic() - start), 60)
    print(f"{len(ops_todo) + len(models_todo)} cases in {minutes} min {seconds} s", flush=True)

    failed = sum(bool(r.error) for r in op_results + model_results)
    if failed:
        print(f"{failed} row(s) FAILED: their reason is in the table and in results.json", flush=True)
    if importlib.util.find_spec("matplotlib") is None:
        print(f"wrote {results.path}; no {png}: pip install matplotlib to draw it", flush=True)
        return
    try:
        drawn = plot(op_results, model_results, png, device_name)
    except Exception as e:
        print(f"wrote {results.path}; {png} not drawn: {describe_failure(e)}", flush=True)
        return
    print(f"wrote {results.path}" + (f" and {drawn}" if drawn else ""), flush=True)


if __name__ == "__main__":
    main()
