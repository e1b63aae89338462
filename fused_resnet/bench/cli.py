"""python -m fused_resnet.bench: runs the cases, prints the table, writes results.json and the plot
(the package docstring says what is measured and how a row reads).
"""

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import sys
import time

import torch

import fused_resnet

from . import overhead
from .cases import DTYPES, MODES, OPS, ModelResult, Result, bytes_moved, model_cases, model_providers, op_cases, op_parts, providers_for
from .report import ResultsFile, format_model_table, format_table, plot
from .runners import make_copy_runner, make_model_runner, make_runner
from .timing import copy_bandwidth_gbps, describe_failure, measure


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


# The name of the copy an op case is held against on a CPU (runners.make_copy_runner).
COPY = "copy"


def run_op_case(device, bandwidth, dtype_name, shape, layout, op, mode, rounds, min_run_time, providers=None):
    """Rows of one op-level case for `providers` (default: providers_for(device)).

    %bw divides a row's GB/s by `bandwidth` (the device's copy bandwidth) on a GPU. On a CPU it
    divides by the rate of a copy of the case's own input (runners.make_copy_runner) timed in the
    case's rounds, or by `bandwidth` if that copy fails: a CPU shared with other processes and
    the host changes speed from minute to minute, so a copy timed once at the start of a run does
    not describe a case timed later; and a large copy writes to memory long untouched, where a
    provider's output lands in the memory the previous call's freed.
    """
    dtype = DTYPES[dtype_name]
    element_size = torch.finfo(dtype).bits // 8
    providers = providers_for(device) if providers is None else providers
    references = {COPY: make_copy_runner(shape, layout, dtype, device)} if device.type == "cpu" else {}
    measured, errors = measure(
        lambda p: make_runner(p, op, shape, layout, dtype, mode, device), providers, device, rounds, min_run_time,
        references=references,
    )
    if COPY in measured:
        bandwidth = 2 * math.prod(shape) * element_size / (measured[COPY][0] * 1e-3) / 1e9  # read x, write its copy
    nbytes = bytes_moved(op, mode, math.prod(shape), element_size)
    nan = float("nan")
    case = []
    for provider in providers:
        if provider in errors:
            case.append(Result(op, shape, dtype_name, layout, mode, provider, nan, nan, nan, None, error=errors[provider]))
            continue
        ms, peak, _ = measured[provider]
        gbps = nbytes / (ms * 1e-3) / 1e9
        case.append(Result(op, shape, dtype_name, layout, mode, provider, ms, gbps, gbps / bandwidth, peak, copy_gbps=bandwidth))
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
        ms, peak, kept = measured[provider]
        case.append(ModelResult(name, shape, dtype_name, layout, mode, provider, ms, shape[0] / (ms * 1e-3), peak, kept))
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
        "--ops", default=",".join(OPS),
        help=f"comma-separated op-level ops, bn_<act> or bn_add_<act> (default: {','.join(OPS)})",
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
    ops = args.ops.split(",")
    for op in ops:
        try:
            op_parts(op)
        except ValueError as e:
            parser.error(f"--ops: {e}")
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
        rows = overhead.run(device, rounds=3 if args.quick else 7, number=50 if args.quick else 200)
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
    against = "; %bw of an op row divides by a copy of the case's input, timed with it" if device.type == "cpu" else ""
    print(f"device copy bandwidth: {bandwidth:.1f} GB/s (read + write){against}", flush=True)
    png = os.path.join(args.output, "speedup.png")
    if os.path.exists(png):
        os.remove(png)  # a run cut off must not leave the plot of an earlier run beside its rows
    results = ResultsFile(
        args.output, {"device": device_name, "versions": versions, "command": command, "copy_bandwidth_gbps": bandwidth}
    )
    print(f"rows go to {results.path} as each case ends", flush=True)

    ops_todo = op_cases(device, dtype_names, args.quick, modes, args.cases, ops)
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
