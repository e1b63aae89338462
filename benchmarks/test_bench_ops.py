"""pytest-benchmark suite, op level: eager vs torch.compile vs every fused backend, per case.

    pytest benchmarks/ --benchmark-only --benchmark-group-by=group
    pytest benchmarks/ --benchmark-disable          # smoke run: quick cases, each once, no timing

Cases and runners are those of `python -m fused_resnet.bench` (fused_resnet/bench/), so both
tools time the same thing. extra_info holds the bytes a fused kernel must move, GB/s, the
fraction of the copy rate the bench holds the case against (conftest.copy_bandwidth_gbps) and the
peak memory of one call.
"""

import math

import torch

from conftest import DEVICE, record, smoke, sync_if_cuda
from fused_resnet import bench

DTYPES = ["fp32", "fp16", "bf16"] if DEVICE.type == "cuda" else ["fp32"]
SMOKE_OPS = ("bn_relu", "bn_add_relu", "bn_silu", "bn_add_relu6")


def _case_id(shape, layout):
    return "x".join(map(str, shape)) + ("-cl" if layout == "channels_last" else "")


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ != "test_op":
        return
    quick = smoke(metafunc.config)
    # smoke mode: both ways the backward finds the activation's derivative (from y for relu and
    # relu6, recomputed for silu), with and without a residual
    cases = bench.op_cases(DEVICE, DTYPES, quick, ops=SMOKE_OPS if quick else bench.OPS)
    metafunc.parametrize(
        "dtype,shape,layout,op,mode", cases,
        ids=[f"{op}-{mode}-{dtype}-{_case_id(shape, layout)}" for dtype, shape, layout, op, mode in cases],
    )
    metafunc.parametrize("provider", bench.providers_for(DEVICE))


def test_op(benchmark, copy_bandwidth_gbps, shape, layout, dtype, op, mode, provider):
    benchmark.group = f"{op} {mode} {dtype} {_case_id(shape, layout)}"
    run = bench.make_runner(provider, op, shape, layout, bench.DTYPES[dtype], mode, DEVICE)
    for _ in range(3):  # warm-up, and torch.compile's compilation, outside the timing
        run()
    peak = bench.peak_memory_bytes(run, DEVICE)
    result = benchmark(sync_if_cuda(run))
    assert result is not None
    nbytes = bench.bytes_moved(op, mode, math.prod(shape), torch.finfo(bench.DTYPES[dtype]).bits // 8)
    copy_bandwidth = copy_bandwidth_gbps(shape, layout, bench.DTYPES[dtype])
    record(benchmark, nbytes=nbytes, copy_bandwidth=copy_bandwidth, peak_bytes=peak)
