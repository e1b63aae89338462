"""pytest-benchmark suite: eager vs torch.compile vs every fused backend, per case.

    pytest benchmarks/ --benchmark-only --benchmark-group-by=group
    pytest benchmarks/ --benchmark-disable          # smoke run: each case once, no timing

Cases and runners are those of `python -m fused_resnet.bench` (fused_resnet/bench.py), so both
tools time the same thing. Each benchmark's extra_info holds the bytes a fused kernel must move.
"""

import math

import pytest
import torch

from conftest import DEVICE
from fused_resnet import bench

CASES = bench.GPU_CASES if DEVICE.type == "cuda" else bench.CPU_CASES
DTYPES = ["bf16", "fp32"] if DEVICE.type == "cuda" else ["fp32"]
PROVIDERS = bench.providers_for(DEVICE)


def _id(shape, layout):
    return "x".join(map(str, shape)) + ("-cl" if layout == "channels_last" else "")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("op", bench.OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,layout", CASES, ids=[_id(s, l) for s, l in CASES])
def test_op(benchmark, shape, layout, dtype, op, mode, provider):
    benchmark.group = f"{op} {mode} {dtype} {_id(shape, layout)}"
    run = bench.make_runner(provider, op, shape, layout, bench.DTYPES[dtype], mode, DEVICE)
    if DEVICE.type == "cuda":
        timed = lambda: (run(), torch.cuda.synchronize())  # noqa: E731  (count async launches)
    else:
        timed = run
    timed()  # warm-up, and torch.compile's compilation, outside the timing
    benchmark(timed)
    nbytes = bench.bytes_moved(op, mode, math.prod(shape), torch.finfo(bench.DTYPES[dtype]).bits // 8)
    benchmark.extra_info["bytes"] = nbytes
    if benchmark.stats is not None:  # None under --benchmark-disable
        seconds = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = nbytes / seconds / 1e9
