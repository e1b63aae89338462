"""The fused residual blocks against their eager twins (fused=False) on the same weights.

Each case runs several SGD steps in float64 and compares outputs, gradients of the input and of
every parameter, the running statistics and the parameters after each step (tests/parity.py).
"""

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet.nn import BasicBlock, BasicBlock3d, Bottleneck, Bottleneck3d
from helpers import DEVICE, make_tensor
from parity import assert_same_training

# (block, inplanes, planes, stride, input spatial shape)
CASES = {
    "basic": (BasicBlock, 8, 8, 1, (7, 5)),
    "basic_downsample": (BasicBlock, 6, 8, 2, (9, 7)),
    "bottleneck": (Bottleneck, 16, 4, 1, (5, 6)),
    "bottleneck_downsample": (Bottleneck, 8, 4, 2, (7, 7)),
    "basic3d_downsample": (BasicBlock3d, 4, 6, 2, (3, 5, 4)),
    "bottleneck3d": (Bottleneck3d, 12, 3, 1, (3, 4, 5)),
    "bottleneck3d_downsample": (Bottleneck3d, 6, 3, 2, (4, 5, 3)),
}


def _downsample(block, inplanes, planes, stride):
    out = planes * block.expansion
    if stride == 1 and inplanes == out:
        return None
    return nn.Sequential(
        block.conv_class(inplanes, out, kernel_size=1, stride=stride, bias=False),
        block.norm_class(out),
    )


def _randomize_norms(model):
    """Non-trivial affine parameters and running statistics, so every term is exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.5)
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)


def make_block_pair(name, dtype=torch.float64):
    block, inplanes, planes, stride, _ = CASES[name]
    fused = block(inplanes, planes, stride, _downsample(block, inplanes, planes, stride))
    eager = block(inplanes, planes, stride, _downsample(block, inplanes, planes, stride), fused=False)
    fused.to(device=DEVICE, dtype=dtype)
    _randomize_norms(fused)
    eager.to(device=DEVICE, dtype=dtype).load_state_dict(fused.state_dict(), strict=True)
    return fused, eager


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_block_matches_eager_twin(backend, name, training):
    fused, eager = make_block_pair(name)
    block, inplanes, _, _, spatial = CASES[name]
    layout = "channels_last" if len(spatial) in (2, 3) and name.endswith("downsample") else "contiguous"
    assert_same_training(
        fused,
        eager,
        lambda: make_tensor((3, inplanes) + spatial, torch.float64, layout),
        torch.float64,
        training=training,
    )


def test_block_module_types():
    fused, eager = make_block_pair("bottleneck_downsample")
    assert type(fused.bn1) is fused_resnet.nn.BatchNormReLU2d
    assert type(fused.bn2) is fused_resnet.nn.BatchNormReLU2d
    assert type(fused.bn3) is fused_resnet.nn.BatchNormAddReLU2d
    assert type(fused.downsample[1]) is nn.BatchNorm2d  # not followed by a ReLU
    assert all(type(getattr(eager, f"bn{i}")) is nn.BatchNorm2d for i in (1, 2, 3))
    fused3d, _ = make_block_pair("basic3d_downsample")
    assert type(fused3d.bn1) is fused_resnet.nn.BatchNormReLU3d
    assert type(fused3d.bn2) is fused_resnet.nn.BatchNormAddReLU3d
    assert fused3d.conv1.kernel_size == (3, 3, 3) and fused3d.conv1.stride == (2, 2, 2)


def test_bottleneck3d_follows_the_seed_layout():
    """1x1x1 / 3x3x3 (stride) / 1x1x1 convolutions, expansion 4 (seed 000's Bottleneck)."""
    block = Bottleneck3d(8, 4, stride=2)
    assert block.conv1.kernel_size == (1, 1, 1) and block.conv1.stride == (1, 1, 1)
    assert block.conv2.kernel_size == (3, 3, 3) and block.conv2.stride == (2, 2, 2)
    assert block.conv3.kernel_size == (1, 1, 1) and block.conv3.out_channels == 4 * Bottleneck3d.expansion


def test_block_constructor_errors():
    with pytest.raises(ValueError, match="only supports groups=1 and base_width=64"):
        BasicBlock(4, 4, groups=2)
    with pytest.raises(NotImplementedError, match="Dilation > 1"):
        BasicBlock(4, 4, dilation=2)
    with pytest.raises(ValueError, match="fused=True needs a norm_layer that makes nn.BatchNorm"):
        Bottleneck(4, 4, norm_layer=lambda c: nn.GroupNorm(2, c))
    eager = Bottleneck(4, 4, norm_layer=lambda c: nn.GroupNorm(2, c), fused=False)
    assert isinstance(eager.bn3, nn.GroupNorm)


def test_block_norm_layer_settings_are_kept():
    """A norm_layer with its own eps/momentum (detection models do this) is kept when fused."""
    norm = lambda c: nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)  # noqa: E731
    block = Bottleneck(8, 2, norm_layer=norm)
    assert type(block.bn3) is fused_resnet.nn.BatchNormAddReLU2d
    assert (block.bn3.eps, block.bn3.momentum) == (1e-3, 0.01)
