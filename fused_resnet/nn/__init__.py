"""Drop-in fused modules, their frozen twins for fine-tuning, residual blocks, and the synchronized
(SyncBatchNorm) variants."""

from .batchnorm import (
    AddReLU,
    BatchNormAddReLU1d,
    BatchNormAddReLU2d,
    BatchNormAddReLU3d,
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
    fuse_batchnorm_,
)
from .frozen import FrozenBatchNorm, FrozenBatchNormAddReLU, FrozenBatchNormReLU, freeze_batchnorm
from .blocks import BasicBlock, BasicBlock3d, Bottleneck, Bottleneck3d
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
    "AddReLU",
    "fuse_batchnorm_",
    "FrozenBatchNorm",
    "FrozenBatchNormReLU",
    "FrozenBatchNormAddReLU",
    "freeze_batchnorm",
    "BasicBlock",
    "Bottleneck",
    "BasicBlock3d",
    "Bottleneck3d",
    "SyncBatchNormReLU",
    "SyncBatchNormAddReLU",
    "convert_sync_batchnorm",
    "DistributedDataParallel",
]
