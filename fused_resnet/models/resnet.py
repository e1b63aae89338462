"""ResNets with torchvision's layout and state_dict keys, built from the fused blocks.

2D (torchvision's `resnet18` ... `resnet152`):
    conv1 7x7/2 -> bn1 -> relu -> maxpool 3x3/2 -> layer1..layer4 -> avgpool -> fc
3D (`resnet3d_18`, `resnet3d_50`, after the DRN of the seed document 000):
    conv1 (3,7,7)/(1,2,2) -> bn1 -> relu -> layer1..layer4 -> avgpool -> fc
layerK holds the blocks of stage K; its first block has stride 1 (layer1) or 2 and a
`downsample` (1x1 convolution + BatchNorm) when the shape changes.

fused=True builds fused blocks and a fused stem BatchNorm + ReLU; fused=False the eager twin with
the same keys, so weights copy between them (`load_state_dict(other.state_dict())`).
"""

from functools import partial

from torch import nn

from ..nn.blocks import (
    BasicBlock,
    BasicBlock3d,
    Bottleneck,
    Bottleneck3d,
    make_norm,
    norm_relu,
)


class ResNet(nn.Module):
    """torchvision's ResNet (the same constructor arguments, plus `fused`), for (N, 3, H, W) input."""

    conv_class = nn.Conv2d
    norm_class = nn.BatchNorm2d

    def __init__(
        self,
        block,
        layers,
        num_classes=1000,
        zero_init_residual=False,
        groups=1,
        width_per_group=64,
        replace_stride_with_dilation=None,
        norm_layer=None,
        fused=True,
    ):
        super().__init__()
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None or a 3-element tuple, got "
                f"{replace_stride_with_dilation}"
            )
        self._norm_layer = norm_layer or self.norm_class
        self._fused = fused
        self.inplanes = 64
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group

        self.conv1 = self._stem_conv()
        self.bn1 = make_norm(self._norm_layer, self.inplanes, fused, block=type(self).__name__)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = self._stem_pool()
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, replace_stride_with_dilation[2])
        self.avgpool = self._global_pool()
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, self.conv_class):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:  # each block starts as the identity
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _stem_conv(self):
        return nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)

    def _stem_pool(self):
        return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def _global_pool(self):
        return nn.AdaptiveAvgPool2d((1, 1))

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                self.conv_class(
                    self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False
                ),
                self._norm_layer(planes * block.expansion),
            )
        make_block = partial(
            block,
            groups=self.groups,
            base_width=self.base_width,
            norm_layer=self._norm_layer,
            fused=self._fused,
        )
        layers = [make_block(self.inplanes, planes, stride, downsample, dilation=previous_dilation)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(make_block(self.inplanes, planes, dilation=self.dilation))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = norm_relu(self.relu, self.bn1, self.conv1(x))
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        return self.fc(x.flatten(1))


class ResNet3d(ResNet):
    """The 3D ResNet of the seed DRN, for (N, 3, D, H, W) input: a (3,7,7) stem with stride
    (1,2,2) and no max pooling; stages 2-4 halve D, H and W."""

    conv_class = nn.Conv3d
    norm_class = nn.BatchNorm3d

    def _stem_conv(self):
        return nn.Conv3d(
            3, self.inplanes, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False
        )

    def _stem_pool(self):
        return nn.Identity()

    def _global_pool(self):
        return nn.AdaptiveAvgPool3d((1, 1, 1))


def resnet18(num_classes=1000, fused=True, **kwargs):
    """ResNet-18: BasicBlock, [2, 2, 2, 2]."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, fused=fused, **kwargs)


def resnet34(num_classes=1000, fused=True, **kwargs):
    """ResNet-34: BasicBlock, [3, 4, 6, 3]."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes=num_classes, fused=fused, **kwargs)


def resnet50(num_classes=1000, fused=True, **kwargs):
    """ResNet-50: Bottleneck, [3, 4, 6, 3]."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, fused=fused, **kwargs)


def resnet101(num_classes=1000, fused=True, **kwargs):
    """ResNet-101: Bottleneck, [3, 4, 23, 3]."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, fused=fused, **kwargs)


def resnet152(num_classes=1000, fused=True, **kwargs):
    """ResNet-152: Bottleneck, [3, 8, 36, 3]."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes=num_classes, fused=fused, **kwargs)


def resnet3d_18(num_classes=400, fused=True, **kwargs):
    """3D ResNet-18: BasicBlock3d, [2, 2, 2, 2]."""
    return ResNet3d(BasicBlock3d, [2, 2, 2, 2], num_classes=num_classes, fused=fused, **kwargs)


def resnet3d_50(num_classes=400, fused=True, **kwargs):
    """3D ResNet-50: Bottleneck3d, [3, 4, 6, 3]."""
    return ResNet3d(Bottleneck3d, [3, 4, 6, 3], num_classes=num_classes, fused=fused, **kwargs)
