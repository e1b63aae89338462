"""The Triton specializations each phase of benchmarks/gpu_check.sh compiles on the GPU, counted
here: the phase's Triton calls run on CPU tensors of the GPU run's shapes and dtypes, planned and
tiled as on the GPU (partition.as_if_on_gpu), each launch recorded by its JIT specialization key
and not run (launch.count_specializations(launch=False)).

    python benchmarks/triton_count.py [--phases b,c,r3] [--sms 132] [--seconds-per-compile S]
        [--out FILE]

Prints one line per phase: distinct specializations, the expected compile seconds at S seconds a
specialization (measured: `tests/compile_triton_kernels.py` prints the mean per variant;
benchmarks/NOTES.md) and whether they fit half the phase's time, those not in an earlier phase
(the correctness phase and the bench run in separate processes, so each compiles its own;
Triton's disk cache turns a repeat into a load), and the count per kernel. Exit status 1 when a
phase's compiles do not fit.
Not counted: the 2**31-element checks of phase b (their own shapes: at most 9 specializations,
the eval apply and the statistics for each of the three shapes), inductor's compiles under torch.compile, and
the test suite on CUDA tensors (phase r1).
"""

import argparse
import contextlib
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # the backend registers for CPU tensors; nothing is launched

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fused_resnet  # noqa: E402
from fused_resnet.contract import op_set_of  # noqa: E402
from fused_resnet.bench import cases as bench_cases  # noqa: E402
from fused_resnet.bench.runners import make_runner  # noqa: E402
from fused_resnet.triton import launch, partition  # noqa: E402

import gpu_correctness  # noqa: E402
from gpu_checks import check_bitwise, check_paths, make  # noqa: E402

H200_SMS = 132
# tests/compile_triton_kernels.py 90 on the 2-core CPU VM, cold Triton cache (benchmarks/NOTES.md)
SECONDS_PER_COMPILE = 0.18

CPU = torch.device("cpu")


def _quietly(fn, *args):
    """Run a check for its launches only: its verdict on unlaunched outputs means nothing."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - comparisons of never-written outputs may raise
        pass


def phase_b():
    """gpu_correctness.py on the triton backend: paths in bf16, fp16, fp32 over every case, the
    other activations' paths (bf16, TRITON_ACT_CASES), the bitwise reruns, the CUDA-graph step (fp32 module training step, channels_last)."""
    ns = op_set_of(torch.ops.fused_resnet_triton)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for shape, layout, _path, _dry in gpu_correctness.CASES:
            _quietly(check_paths, ns, CPU, shape, layout, dtype)
    for shape, layout in gpu_correctness.TRITON_ACT_CASES:
        for act in gpu_correctness.ACTIVATIONS:
            _quietly(check_paths, ns, CPU, shape, layout, torch.bfloat16, act, gpu_correctness.ACT_SLOPE)
    for shape, layout in gpu_correctness.GPU_BITWISE:
        _quietly(check_bitwise, ns, CPU, shape, layout, torch.bfloat16)
    shape = (16, 32, 14, 14)  # gpu_checks.check_graph's step
    bn = fused_resnet.nn.BatchNormAddReLU2d(shape[1])
    x, r, dy = (make(shape, torch.float32, "channels_last", CPU).requires_grad_() for _ in range(3))
    with fused_resnet.use_backend("triton"):
        y = bn(x, r)
        torch.autograd.grad(y, (x, r, bn.weight, bn.bias), dy.detach())


@contextlib.contextmanager
def _unfilled_random_tensors():
    """torch.randn and randn_like allocate without drawing: no kernel reads the values here, and
    drawing the bench's inputs (50M values a tensor) would take most of the count's time."""
    randn, randn_like = torch.randn, torch.randn_like
    torch.randn = lambda *size, **kw: torch.empty(*size, **kw)
    torch.randn_like = lambda t, **kw: torch.empty_like(t, **kw)
    try:
        yield
    finally:
        torch.randn, torch.randn_like = randn, randn_like


# The ops of gpu_check.sh's bench chunks: the ReLU ones in every dtype, the other activations'
# (its "acts" chunk) in bf16, channels_last.
RELU_OPS = ("bn_relu", "bn_add_relu")
ACT_OPS = ("bn_silu", "bn_add_silu", "bn_relu6")


def _bench(dtype_name, ops, layouts=("contiguous", "channels_last")):
    """The op-level bench's triton provider: `ops`, eval and train-fwd+bwd, the GPU cases in `layouts`."""
    dtype = bench_cases.DTYPES[dtype_name]
    with _unfilled_random_tensors():
        for shape, layout in bench_cases.GPU_CASES:
            if layout not in layouts:
                continue
            for op in ops:
                for mode in ("eval", "train-fwd+bwd"):
                    make_runner("triton", op, shape, layout, dtype, mode, CPU, rotate=False)()


# phase: (title, workload, the phase's seconds in gpu_check.sh for the part that compiles them)
PHASES = {
    "b": ("correctness (gpu_correctness.py, triton)", phase_b, 110),
    "c": ("bench bf16", lambda: (_bench("bf16", RELU_OPS), _bench("bf16", ACT_OPS, ("channels_last",))), 170),
    "r3": ("bench fp16 and fp32", lambda: (_bench("fp16", RELU_OPS), _bench("fp32", RELU_OPS)), 40),
}
# A phase fits when its compiles take at most this share of its seconds (the rest runs the checks).
COMPILE_SHARE = 0.5


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phases", default="b,c,r3")
    p.add_argument("--sms", type=int, default=H200_SMS, help="SMs of the GPU planned for (H200: 132)")
    p.add_argument("--seconds-per-compile", type=float, default=SECONDS_PER_COMPILE)
    p.add_argument("--out", default=None, help="JSON file of the counts")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    seen = set()
    report = {}
    status = 0
    for phase in args.phases.split(","):
        title, workload, limit = PHASES[phase]
        with launch.count_specializations(launch=False) as counter, partition.as_if_on_gpu(args.sms):
            workload()
        new = counter.keys - seen
        seen |= counter.keys
        seconds = len(counter.keys) * args.seconds_per_compile
        fits = seconds <= COMPILE_SHARE * limit
        status = status or (0 if fits else 1)
        report[phase] = {"title": title, "specializations": len(counter.keys), "new": len(new),
                         "per_kernel": counter.per_kernel(), "expected_compile_s": round(seconds, 1),
                         "limit_s": limit, "fits": fits}
        print(f"phase {phase} ({title}): {len(counter.keys)} Triton specializations, about {seconds:.0f} s "
              f"of compiles at {args.seconds_per_compile} s each, {'fits' if fits else 'EXCEEDS'} "
              f"{COMPILE_SHARE:.0%} of its {limit} s; {len(new)} not in an earlier phase; {counter.per_kernel()}",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(report, sms=args.sms, seconds_per_compile=args.seconds_per_compile), f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
