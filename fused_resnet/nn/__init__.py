"""Drop-in fused modules."""

from .batchnorm import (
    BatchNormAddReLU1d,
    BatchNormAddReLU2d,
    BatchNormAddReLU3d,
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
)

__all__ = [
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "BatchNormAddReLU1d",
    "BatchNormAddReLU2d",
    "BatchNormAddReLU3d",
]
