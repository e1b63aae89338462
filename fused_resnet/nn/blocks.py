"""Residual blocks with torchvision's attribute names, constructor and forward, fused or eager.

    BasicBlock:   out = relu(bn2(conv2(relu(bn1(conv1(x))))) + identity)
    Bottleneck:   out = relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + identity)
    identity = downsample(x) when a downsample module is given, else x

With fused=True (the default) every BatchNorm followed by a ReLU is a BatchNormReLU*d, and the
last one a BatchNormAddReLU*d that takes the identity as its residual: one kernel each instead of
BatchNorm, add and ReLU apart. fused=False builds the plain eager twin. Both have the same
parameters, buffers and state_dict keys as torchvision's blocks (conv1, bn1, conv2, bn2, conv3,
bn3, downsample; relu holds no state), so state dicts load strictly across all three.

BasicBlock3d and Bottleneck3d are the same with Conv3d and BatchNorm*3d (kernels 3x3x3, and
1x1x1 / 3x3x3 / 1x1x1 with expansion 4 for the bottleneck).
"""

from torch import nn

from .batchnorm import AddReLU, _BatchNormAddAct, _BatchNormAct, fuse_batchnorm_
from .frozen import FrozenBatchNormAddReLU, FrozenBatchNormReLU

# Modules that apply the ReLU themselves, and those that also take the residual: the fused
# BatchNorms, their frozen twins (freeze_batchnorm), and what optimize_for_inference leaves of
# them once the normalization is folded.
_APPLIES_RELU = (_BatchNormAct, FrozenBatchNormReLU, nn.ReLU)
_ADDS_RESIDUAL = (_BatchNormAddAct, FrozenBatchNormAddReLU, AddReLU)


def norm_relu(relu, norm, x):
    """relu(norm(x)); one call when `norm` applies the ReLU itself."""
    if isinstance(norm, _APPLIES_RELU):
        return norm(x)
    return relu(norm(x))


def norm_add_relu(relu, norm, x, residual):
    """relu(norm(x) + residual); one call when `norm` takes the residual itself."""
    if isinstance(norm, _ADDS_RESIDUAL):
        return norm(x, residual)
    out = norm(x)
    out += residual
    return relu(out)


def make_norm(norm_layer, channels, fused, with_residual=False, block="block"):
    """norm_layer(channels), made its fused twin (a BatchNormReLU*d, or a BatchNormAddReLU*d when
    with_residual) if fused."""
    norm = norm_layer(channels)
    if fused:
        try:
            fuse_batchnorm_(norm, with_residual)
        except TypeError:
            raise ValueError(
                f"{block}: fused=True needs a norm_layer that makes nn.BatchNorm modules, got "
                f"{type(norm).__name__}; pass fused=False for other normalizations"
            ) from None
    return norm


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (two 3x3 convolutions), with fused BatchNorm + (add +) ReLU."""

    expansion = 1
    conv_class = nn.Conv2d
    norm_class = nn.BatchNorm2d

    def __init__(
        self,
        inplanes,
        planes,
        stride=1,
        downsample=None,
        groups=1,
        base_width=64,
        dilation=1,
        norm_layer=None,
        fused=True,
    ):
        super().__init__()
        name = type(self).__name__
        if groups != 1 or base_width != 64:
            raise ValueError(f"{name} only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError(f"Dilation > 1 not supported in {name}")
        norm_layer = norm_layer or self.norm_class
        conv = self.conv_class
        self.conv1 = conv(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm_layer, planes, fused, block=name)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = make_norm(norm_layer, planes, fused, with_residual=True, block=name)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = norm_relu(self.relu, self.bn1, self.conv1(x))
        out = self.conv2(out)
        identity = x if self.downsample is None else self.downsample(x)
        return norm_add_relu(self.relu, self.bn2, out, identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (ResNet v1.5: the stride on the 3x3 convolution), with fused
    BatchNorm + (add +) ReLU. width = planes * base_width / 64 * groups; output planes * 4."""

    expansion = 4
    conv_class = nn.Conv2d
    norm_class = nn.BatchNorm2d

    def __init__(
        self,
        inplanes,
        planes,
        stride=1,
        downsample=None,
        groups=1,
        base_width=64,
        dilation=1,
        norm_layer=None,
        fused=True,
    ):
        super().__init__()
        name = type(self).__name__
        norm_layer = norm_layer or self.norm_class
        conv = self.conv_class
        width = int(planes * (base_width / 64.0)) * groups
        out_planes = planes * self.expansion
        self.conv1 = conv(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = make_norm(norm_layer, width, fused, block=name)
        self.conv2 = conv(
            width,
            width,
            kernel_size=3,
            stride=stride,
            padding=dilation,
            groups=groups,
            dilation=dilation,
            bias=False,
        )
        self.bn2 = make_norm(norm_layer, width, fused, block=name)
        self.conv3 = conv(width, out_planes, kernel_size=1, bias=False)
        self.bn3 = make_norm(norm_layer, out_planes, fused, with_residual=True, block=name)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        out = norm_relu(self.relu, self.bn1, self.conv1(x))
        out = norm_relu(self.relu, self.bn2, self.conv2(out))
        out = self.conv3(out)
        identity = x if self.downsample is None else self.downsample(x)
        return norm_add_relu(self.relu, self.bn3, out, identity)


class BasicBlock3d(BasicBlock):
    """BasicBlock with 3x3x3 Conv3d and BatchNorm*3d, for (N, C, D, H, W) input."""

    conv_class = nn.Conv3d
    norm_class = nn.BatchNorm3d


class Bottleneck3d(Bottleneck):
    """Bottleneck with Conv3d (1x1x1 / 3x3x3 / 1x1x1, expansion 4) and BatchNorm*3d."""

    conv_class = nn.Conv3d
    norm_class = nn.BatchNorm3d
