"""The ResNet builders: torchvision's state_dict keys and shapes, and fused == eager twin.

torchvision cannot be installed on these machines, so the expected keys and shapes of resnet18 and
resnet50 are written here from the architecture torchvision documents (He et al. 2015, "ResNet
v1.5": stride on the 3x3 convolution of the bottleneck), and the parameter counts are the ones
torchvision's model pages list. Where torchvision is importable, a further test compares key for
key and output for output.
"""

import importlib.util

import pytest
import torch

from fused_resnet import models
from helpers import DEVICE, make_tensor
from parity import assert_same_training

# torchvision's documented parameter counts (docs: "num_params" of the IMAGENET1K_V1 weights).
TORCHVISION_NUM_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032}


def _bn_entries(prefix, channels):
    return [
        (f"{prefix}.weight", (channels,)),
        (f"{prefix}.bias", (channels,)),
        (f"{prefix}.running_mean", (channels,)),
        (f"{prefix}.running_var", (channels,)),
        (f"{prefix}.num_batches_tracked", ()),
    ]


def expected_state_dict_shapes(arch, num_classes):
    """(key, shape) in torchvision's order, from the table of stages and block convolutions."""
    bottleneck = arch == "resnet50"
    blocks_per_stage = [3, 4, 6, 3] if bottleneck else [2, 2, 2, 2]
    expansion = 4 if bottleneck else 1
    entries = [("conv1.weight", (64, 3, 7, 7))] + _bn_entries("bn1", 64)
    channels = 64
    for stage, (width, count) in enumerate(zip([64, 128, 256, 512], blocks_per_stage), start=1):
        out = width * expansion
        for index in range(count):
            prefix = f"layer{stage}.{index}"
            if bottleneck:  # 1x1 reduce, 3x3, 1x1 expand
                convs = [(channels, width, 1), (width, width, 3), (width, out, 1)]
            else:  # two 3x3
                convs = [(channels, width, 3), (width, width, 3)]
            for i, (cin, cout, k) in enumerate(convs, start=1):
                entries.append((f"{prefix}.conv{i}.weight", (cout, cin, k, k)))
                entries += _bn_entries(f"{prefix}.bn{i}", cout)
            if index == 0 and (stage > 1 or channels != out):  # projection shortcut
                entries.append((f"{prefix}.downsample.0.weight", (out, channels, 1, 1)))
                entries += _bn_entries(f"{prefix}.downsample.1", out)
            channels = out
    entries += [("fc.weight", (num_classes, channels)), ("fc.bias", (num_classes,))]
    return entries


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
def test_state_dict_keys_and_shapes(arch, fused):
    model = getattr(models, arch)(num_classes=17, fused=fused)
    actual = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert actual == expected_state_dict_shapes(arch, 17)
    num_params = sum(p.numel() for p in getattr(models, arch)(fused=fused).parameters())
    assert num_params == TORCHVISION_NUM_PARAMS[arch]


@pytest.mark.parametrize("arch", ["resnet34", "resnet101", "resnet152"])
def test_deeper_models_have_their_stage_depths(arch):
    depths = {"resnet34": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3], "resnet152": [3, 8, 36, 3]}
    model = getattr(models, arch)(num_classes=3)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == depths[arch]
    eager = getattr(models, arch)(num_classes=3, fused=False)
    eager.load_state_dict(model.state_dict(), strict=True)


def test_resnet3d_layout():
    model = models.resnet3d_50(num_classes=5)
    assert model.conv1.kernel_size == (3, 7, 7) and model.conv1.stride == (1, 2, 2)
    assert type(model.layer1[0]).__name__ == "Bottleneck3d"
    assert model.fc.in_features == 2048
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert len(models.resnet3d_18(num_classes=5).layer4) == 2


def test_zero_init_residual_zeroes_the_last_norm_of_each_block():
    for builder, last in ((models.resnet18, "bn2"), (models.resnet50, "bn3")):
        model = builder(num_classes=3, zero_init_residual=True)
        for layer in (model.layer1, model.layer4):
            assert all(torch.all(getattr(b, last).weight == 0) for b in layer)


# (builder, input shape, SGD steps): small inputs, yet stage 4 still normalizes over 8 values per
# channel (with 2 the training-mode BatchNorm gradient is mathematically ~0 and only rounding is
# left); one step for the costly float64 ones.
PARITY = {
    "resnet18": (models.resnet18, (2, 3, 64, 64), 2),
    "resnet50": (models.resnet50, (2, 3, 48, 48), 1),
    "resnet3d_18": (models.resnet3d_18, (2, 3, 2, 20, 20), 1),
}


@pytest.mark.parametrize("arch", PARITY)
def test_fused_model_matches_eager_twin(arch):
    """On the default backend; every backend runs the blocks in test_blocks.py."""
    builder, shape, steps = PARITY[arch]
    torch.manual_seed(0)
    fused = builder(num_classes=7).to(device=DEVICE, dtype=torch.float64)
    eager = builder(num_classes=7, fused=False).to(device=DEVICE, dtype=torch.float64)
    eager.load_state_dict(fused.state_dict(), strict=True)
    layout = "channels_last" if arch == "resnet18" else "contiguous"
    assert_same_training(
        fused, eager, lambda: make_tensor(shape, torch.float64, layout), torch.float64, steps=steps
    )


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed"
)
@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_torchvision_state_dict_compatibility(arch):
    import torchvision

    reference = getattr(torchvision.models, arch)(num_classes=11).eval()
    for fused in (True, False):
        model = getattr(models, arch)(num_classes=11, fused=fused).eval()
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        assert list(ours.items()) == list(theirs.items())
        model.load_state_dict(reference.state_dict(), strict=True)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)
