"""Drop-in fused modules, and their synchronized (SyncBatchNorm) variants."""

from .batchnorm import (
    BatchNormAddReLU1d,
    BatchNormAddReLU2d,
    BatchNormAddReLU3d,
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
)
from .syncbn import (
    DistributedDataParallel,
    SyncBatchNormAddReLU,
    SyncBatchNormReLU,
    convert_sync_batchnorm,
)

__all__ = [
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "BatchNormAddReLU1d",
    "BatchNormAddReLU2d",
    "BatchNormAddReLU3d",
    "SyncBatchNormReLU",
    "SyncBatchNormAddReLU",
    "convert_sync_batchnorm",
    "DistributedDataParallel",
]
