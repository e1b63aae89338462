"""pytest-benchmark suite, model level: training steps and inference of fused_resnet.bench's model
cases (ResNets, and torchvision's MobileNetV2 and EfficientNet-B0 when torchvision is installed).

Providers: the eager model, its fused twin on the same weights, and both under torch.compile.
extra_info holds images (or clips) per second, the peak memory of one call and, for a training
step, the memory its forward keeps for the backward. GPU: real sizes (bf16 autocast,
channels_last); CPU: resnet18, resnet3d_18 and the torchvision models on tiny inputs. In smoke
mode (--benchmark-disable) a tiny ResNet-50, MobileNetV2 and EfficientNet-B0 run eager and fused:
compiling a whole model takes minutes on a small CPU.
"""

import pytest

from conftest import DEVICE, record, smoke, sync_if_cuda
from fused_resnet import bench


def _case_id(name, shape):
    return f"{name}-{'x'.join(map(str, shape))}"


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ != "test_model":
        return
    quick = smoke(metafunc.config)
    cases = bench.model_cases(DEVICE, ["bf16", "fp32"], quick and DEVICE.type == "cpu")
    metafunc.parametrize(
        "name,shape,dtype,layout,mode", cases, ids=[f"{_case_id(c[0], c[1])}-{c[2]}-{c[4]}" for c in cases]
    )
    metafunc.parametrize("provider", bench.model_providers(DEVICE, quick))


def test_model(benchmark, name, shape, dtype, layout, mode, provider):
    if name in bench.TORCHVISION_MODELS:
        pytest.importorskip("torchvision", reason=f"the model case {name} is torchvision's")
    benchmark.group = f"{name} {mode} {dtype} {'x'.join(map(str, shape))}"
    run = bench.make_model_runner(provider, name, shape, mode, DEVICE, bench.DTYPES[dtype], layout)
    for _ in range(2):  # warm-up, and torch.compile's compilation, outside the timing
        run()
    peak = bench.peak_memory_bytes(run, DEVICE)
    # a training step's forward keeps what its backward needs; an inference batch keeps nothing
    kept = bench.backward_kept_bytes(run.training_forward, DEVICE) if mode == "train" else None
    result = benchmark(sync_if_cuda(run))
    assert result is not None
    record(benchmark, items=shape[0], peak_bytes=peak, kept_bytes=kept)
