"""Correctness of the GPU backends ("cuda", "triton") on CUDA tensors against the float64 oracle,
one JSON line per check, written as soon as the check ends (phase b of benchmarks/gpu_check.sh):

    python benchmarks/gpu_correctness.py --device cuda --out OUTDIR/correctness.jsonl
    python benchmarks/gpu_correctness.py --device cpu ...   (dry run: the "cpu" backend stands in
        for "cuda", Triton runs on its interpreter, small shapes, no bfloat16 for Triton)

Checks, one backend after the other (cuda first), most telling first, so a run cut off by its
time limit keeps those: bf16 paths, activations, bitwise, graph, compile, big, then fp16 and fp32
paths.
  paths/<backend>/<dtype>/<case>  every kernel path (module CASES): training forward, eval, the
      fused backward (batch and running statistics) and the SyncBatchNorm pieces (bn_stats,
      bn_act_bwd_reduce, bn_act_bwd_apply), with and without residual, ReLU
  acts/<backend>/<act>/<case>  the same with every other activation (ACT_CASES, TRITON_ACT_CASES;
      bf16; fp16 in the dry run)
  bitwise/<backend>/<case>   the same inputs twice give torch.equal results (split reductions)
  graph/<backend>            a training step (forward + backward of a fused module) captured in a
                             CUDA graph and replayed on new inputs equals the same step run eagerly
  graph-bn_act/<backend>     the module op's training forward captured, replayed on new inputs:
                             output and running statistics against float64 eager, step by step
  reduce-overhead/<backend>  torch.compile(fullgraph=True, mode="reduce-overhead") of the module,
                             training steps: outputs, grad_input, running statistics, and whether
                             inductor's CUDA graphs were taken (gpu_capture_checks.py)
  compile/<backend>          torch.compile(fullgraph=True) with inductor of a block of two fused
                             modules, training and eval, against eager float64
  big/<backend>/<kind>       a bfloat16 tensor of more than 2**31 elements: eval output and batch
                             statistics, compared on a few channels and slices (kind: planes, rows,
                             flat: planes the CUDA apply passes read flat)
A line: {"check", "backend", "passed", "max_err" (largest |actual - float64|), "tol_ratio" (largest
error over its tolerance; passed means <= 1), "worst" (the output it came from), "seconds",
"triton_specializations" (Triton kernels compiled so far in this process: JIT compile time is GPU
time), "new_specializations", "detail"}. A check that cannot run here is a line with
"skipped": reason and passed null. The last line is {"check": "summary", ...}. Exit status 1 if a
check failed.

Tolerances: tests/tolerances.py (the suite's table); per-channel sums and grad_input get the
suite's widened atol (tests/helpers.py sum_atol_scale and grad_input_gain, mirrored in gpu_checks.py).
"""

import argparse
import json
import os
import re
import sys
import time

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", required=True, help="JSON lines file (appended to)")
    p.add_argument("--only", default=None, metavar="REGEX", help="only the checks whose name matches")
    p.add_argument(
        "--break-backend", default=None, metavar="NAME",
        help="perturb that backend's forward outputs by +1, to see that checks really fail (tests only)",
    )
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (by fused_resnet)

import torch  # noqa: E402

import fused_resnet  # noqa: E402
from fused_resnet import contract  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_checks import (  # noqa: E402
    Broken,
    break_backend,
    check_big,
    check_bitwise,
    check_compile,
    check_graph,
    check_paths,
    op_namespace,
    triton_specializations,
)
from gpu_capture_checks import check_bn_act_graph, check_bn_act_reduce_overhead  # noqa: E402
from gpu_capture_checks import skipped_on as capture_skipped_on  # noqa: E402

# (shape, layout, the kernel path it reaches, dry run). On a GPU every case runs on every backend.
# The dry run (CPU) runs the cases marked "native" on the cpu backend only and those marked "all"
# on the Triton interpreter too, which takes seconds per case.
CASES = [
    ((4, 8, 16, 16), "contiguous", "planes, 16-byte accesses (S = 256)", "native"),
    ((3, 5, 7, 7), "contiguous", "planes, scalar accesses (S = 49); apply passes flat", "all"),
    ((4, 6, 33), "contiguous", "planes 1D (N, C, L), scalar; apply passes flat", None),
    ((4, 6, 3, 3), "contiguous", "planes, scalar (S = 9); apply flat, vectors spanning two planes", None),
    ((2, 4, 3, 8, 8), "contiguous", "planes 3D, 16-byte accesses", None),
    ((2, 64, 8, 8), "channels_last", "rows, 16-byte accesses (C = 64)", "native"),
    ((2, 19, 5, 5), "channels_last", "rows, scalar accesses (C odd)", "all"),
    ((37, 70), "contiguous", "rows 1D (N, C): S == 1, C not a multiple of 8", None),
    ((2, 24, 3, 7, 9), "channels_last", "rows 3D (channels_last_3d)", "native"),
    ((2, 300, 3, 3), "channels_last", "rows, several column tiles", None),
    ((64, 3, 40, 40), "contiguous", "planes, each channel split over many blocks", None),
    ((64, 40, 24, 24), "channels_last", "rows, many row blocks (split reduction)", None),
]
# The activations other than ReLU (every path above runs ReLU), bf16, on one case of each layout
# with 16-byte accesses, with leaky_relu's slope not the default: (shape, layout) on a GPU, the
# first alone in the dry run (the cpu backend).
ACTIVATIONS = [a for a in contract.ACTIVATIONS if a != "relu"]
ACT_SLOPE = 0.2
ACT_CASES = [((4, 8, 16, 16), "contiguous"), ((2, 64, 8, 8), "channels_last")]
# Triton compiles a kernel per activation: the rows case alone keeps phase b's compiles within
# its budget (benchmarks/triton_count.py: 262 specializations with it, 329 with both).
TRITON_ACT_CASES = ACT_CASES[1:]
# (shape, layout) of the bitwise reruns: the split reductions, where an order could vary.
GPU_BITWISE = [((64, 3, 40, 40), "contiguous"), ((64, 40, 24, 24), "channels_last")]
CPU_BITWISE = [((8, 3, 12, 12), "contiguous"), ((8, 16, 6, 6), "channels_last")]
# More than 2**31 elements; the Triton kernels index one channel's values with int32, so
# n_outer and n_inner each stay below 2**31 (planes: n_inner = 2**28 + 8; rows: n_outer = N*S).
# flat: planes of 2**28 + 9 elements, which the CUDA apply passes read flat (64-bit indices).
GPU_BIG = {"planes": ((2, 4, 2**28 + 8), "contiguous"), "rows": ((2**15 + 1, 64, 32, 32), "channels_last"),
           "flat": ((2, 4, 2**28 + 9), "contiguous")}
CPU_BIG = {"planes": ((2, 4, 1000), "contiguous"), "rows": ((3, 8, 4, 4), "channels_last"),
           "flat": ((2, 4, 1001), "contiguous")}

# ---------------------------------------------------------------------------------------------
# Driver.


class Writer:
    def __init__(self, path):
        self.path = path
        self.counts = {"passed": 0, "failed": 0, "skipped": 0}

    def write(self, line):
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def run(self, name, backend, fn, skip=None):
        if ARGS.only and not re.search(ARGS.only, name):
            return
        line = {"check": name, "backend": backend}
        if skip:
            line.update(passed=None, skipped=skip)
            self.counts["skipped"] += 1
            self.write(line)
            print(f"SKIP {name}: {skip}", flush=True)
            return
        before = triton_specializations()
        start = time.perf_counter()
        try:
            errs, detail = fn()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            line.update(passed=errs.passed, max_err=errs.max_err, tol_ratio=errs.tol_ratio, worst=errs.worst, detail=detail)
        except Exception as error:  # a crash is a failed check, and the next check runs
            line.update(passed=False, max_err=None, tol_ratio=None, worst="", detail=f"{type(error).__name__}: {error}"[:2000])
        line["seconds"] = round(time.perf_counter() - start, 3)
        after = triton_specializations()
        line["triton_specializations"] = after
        line["new_specializations"] = None if after is None else after - (before or 0)
        self.counts["passed" if line["passed"] else "failed"] += 1
        self.write(line)
        print(f"{'PASS' if line['passed'] else 'FAIL'} {name}: tol_ratio {line['tol_ratio']} "
              f"({line['worst']}) {line['seconds']} s {line['detail']}", flush=True)


def main():
    global DEVICE
    DEVICE = torch.device(ARGS.device)
    gpu = DEVICE.type == "cuda"
    if gpu and not torch.cuda.is_available():
        print("gpu_correctness: --device cuda needs a GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    # The fused "cuda" role: the CUDA kernels on a GPU, their CPU twins in the dry run.
    native = "cuda" if gpu else "cpu"
    available = fused_resnet.available_backends(DEVICE)
    backends = [name for name in (native, "triton") if name in available]
    if ARGS.break_backend:
        break_backend(ARGS.break_backend)
    writer = Writer(ARGS.out)
    start = time.perf_counter()
    for name in (native, "triton"):
        if name not in available:
            writer.run(f"paths/{name}", name, None, skip=f"backend {name!r} not available on {DEVICE.type}")

    def ns_of(name):
        ns = op_namespace(name)
        return Broken(ns) if name == ARGS.break_backend else ns

    big_dtype = torch.bfloat16 if gpu else torch.float16  # the interpreter gives NaN for bf16

    def paths(name, ns, dtype):
        cases = [c for c in CASES if gpu or c[3] == "all" or (c[3] == "native" and name == native)]
        if name == "triton" and not gpu and dtype == torch.bfloat16:
            writer.run(f"paths/{name}/bfloat16", name, None,
                       skip="the Triton interpreter gives NaN for bfloat16 (a CUDA run covers it)")
            return
        for shape, layout, _path, _dry in cases:
            label = f"paths/{name}/{str(dtype)[6:]}/{'x'.join(map(str, shape))}-{layout}"
            writer.run(label, name, lambda: check_paths(ns, DEVICE, shape, layout, dtype))

    # One backend after the other, the cuda kernels first (fast: a cut-off phase loses Triton
    # checks, whose JIT compiles dominate). Per backend: bf16 paths (the goals' dtype, and the one
    # the interpreter cannot check in CI), then the special checks, then fp16 and fp32 paths.
    for name in backends:
        ns = ns_of(name)
        paths(name, ns, torch.bfloat16)
        if name == native:
            act_cases = ACT_CASES if gpu else ACT_CASES[:1]
        else:  # Triton: on the interpreter the activations are the suite's to check
            act_cases = TRITON_ACT_CASES if gpu else []
        for shape, layout in act_cases:
            for act in ACTIVATIONS:
                writer.run(f"acts/{name}/{act}/{'x'.join(map(str, shape))}-{layout}", name,
                           lambda: check_paths(ns, DEVICE, shape, layout, big_dtype, act, ACT_SLOPE))
        for shape, layout in GPU_BITWISE if gpu else CPU_BITWISE:
            writer.run(f"bitwise/{name}/{'x'.join(map(str, shape))}-{layout}", name,
                       lambda: check_bitwise(ns, DEVICE, shape, layout, big_dtype))
        writer.run(f"graph/{name}", name, lambda: check_graph(name, DEVICE, torch.float32),
                   skip=None if gpu else "CUDA graphs need a GPU")
        writer.run(f"graph-bn_act/{name}", name, lambda: check_bn_act_graph(name, DEVICE),
                   skip=capture_skipped_on(DEVICE))
        writer.run(f"reduce-overhead/{name}", name, lambda: check_bn_act_reduce_overhead(name, DEVICE),
                   skip=capture_skipped_on(DEVICE))
        # The dry run checks the capture (fullgraph) and AOT autograd, not inductor: its CPU C++
        # compile takes minutes here, and Triton's interpreter cannot run on traced tensors.
        dynamo_backend = "inductor" if gpu else ("eager" if name == "triton" else "aot_eager")
        writer.run(f"compile/{name}", name, lambda: check_compile(name, DEVICE, dynamo_backend))
        for kind, (shape, layout) in (GPU_BIG if gpu else CPU_BIG).items():
            writer.run(f"big/{name}/{kind}", name, lambda: check_big(ns, DEVICE, shape, layout, big_dtype))
            if gpu:
                torch.cuda.empty_cache()
        paths(name, ns, torch.float16)
        paths(name, ns, torch.float32)
    summary = dict({f"n_{k}": v for k, v in writer.counts.items()}, check="summary", seconds=round(time.perf_counter() - start, 1),
                   triton_specializations=triton_specializations(), device=str(DEVICE),
                   device_name=torch.cuda.get_device_name(DEVICE) if gpu else "cpu (dry run)")
    writer.write(summary)
    print(f"gpu_correctness: {writer.counts['passed']} passed, {writer.counts['failed']} failed, "
          f"{writer.counts['skipped']} skipped in {summary['seconds']} s; Triton specializations "
          f"{summary['triton_specializations']}", flush=True)
    return 1 if writer.counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
