"""Shared by the pytest-benchmark suite: the device, smoke mode and the measured copy bandwidth.

Under --benchmark-disable (what CI runs) the suite is a smoke test: the quick cases of
fused_resnet.bench, each run once, and no bandwidth measurement.
"""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fused_resnet import bench  # noqa: E402

DEVICE = torch.device(os.environ.get("FUSED_RESNET_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


def smoke(config) -> bool:
    return bool(config.getoption("benchmark_disable", default=False))


@pytest.fixture(scope="session")
def copy_bandwidth_gbps(request):
    """copy_bandwidth_gbps(shape, layout, dtype): the copy rate an op case is held against, as
    python -m fused_resnet.bench holds it (None in smoke mode). GPU: the device's copy bandwidth,
    measured once per run. CPU: a copy of the case's input rotated out of the cache
    (bench.make_copy_runner), measured once per shape, layout and dtype; pytest-benchmark times
    one test at a time, so it is not interleaved with the providers as the CLI's is."""
    if smoke(request.config):
        return lambda shape, layout, dtype: None
    if DEVICE.type == "cuda":
        bandwidth = bench.copy_bandwidth_gbps(DEVICE)
        return lambda shape, layout, dtype: bandwidth
    measured = {}

    def for_case(shape, layout, dtype):
        if (shape, layout, dtype) not in measured:
            run = bench.make_copy_runner(shape, layout, dtype, DEVICE)
            ms = bench.time_side_by_side({"copy": run}, DEVICE)["copy"]
            measured[shape, layout, dtype] = 2 * math.prod(shape) * (torch.finfo(dtype).bits // 8) / (ms * 1e-3) / 1e9
        return measured[shape, layout, dtype]

    return for_case


def sync_if_cuda(run):
    """A timer must count asynchronous CUDA work: each timed call ends with a synchronize."""
    if DEVICE.type != "cuda":
        return run

    def timed():
        result = run()
        torch.cuda.synchronize(DEVICE)
        return result

    return timed


def record(benchmark, nbytes=None, items=None, copy_bandwidth=None, peak_bytes=None, kept_bytes=None):
    """extra_info of one benchmark: what was moved or processed, and the rates it gives.
    kept_bytes: what a training step keeps for its backward (bench.backward_kept_bytes)."""
    info = benchmark.extra_info
    if peak_bytes is not None:
        info["peak_memory_bytes"] = peak_bytes
    if kept_bytes is not None:
        info["backward_kept_bytes"] = kept_bytes
    if nbytes is not None:
        info["bytes"] = nbytes
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    seconds = benchmark.stats.stats.median
    if nbytes is not None:
        info["GB/s"] = nbytes / seconds / 1e9
        if copy_bandwidth:
            info["fraction_of_copy_bandwidth"] = info["GB/s"] / copy_bandwidth
    if items is not None:
        info["items/s"] = items / seconds
