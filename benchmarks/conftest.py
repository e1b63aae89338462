"""Shared by the pytest-benchmark suite: the device, smoke mode and the measured copy bandwidth.

Under --benchmark-disable (what CI runs) the suite is a smoke test: the quick cases of
fused_resnet.bench, each run once, and no bandwidth measurement.
"""

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
    """The device's copy bandwidth, measured once per run (None in smoke mode)."""
    if smoke(request.config):
        return None
    return bench.copy_bandwidth_gbps(DEVICE)


def sync_if_cuda(run):
    """A timer must count asynchronous CUDA work: each timed call ends with a synchronize."""
    if DEVICE.type != "cuda":
        return run

    def timed():
        result = run()
        torch.cuda.synchronize(DEVICE)
        return result

    return timed


def record(benchmark, nbytes=None, items=None, copy_bandwidth=None, peak_bytes=None):
    """extra_info of one benchmark: what was moved or processed, and the rates it gives."""
    info = benchmark.extra_info
    if peak_bytes is not None:
        info["peak_memory_bytes"] = peak_bytes
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
