"""ResNet builders with torchvision's layout and state_dict keys; fused=False gives the eager twin."""

from .resnet import (
    ResNet,
    ResNet3d,
    resnet3d_18,
    resnet3d_50,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
)

__all__ = [
    "ResNet",
    "ResNet3d",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet3d_18",
    "resnet3d_50",
]
