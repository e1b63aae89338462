"""fused_resnet.convert on frozen BatchNorms: torchvision's FrozenBatchNorm2d (timm's
freeze_batch_norm_2d puts it in too), timm's FrozenBatchNormAct2d and this package's
FrozenBatchNorm become FrozenBatchNormReLU / FrozenBatchNormAddReLU before a ReLU (an add and a
ReLU), FrozenBatchNormAct / FrozenBatchNormAddAct before the other activations, keeping their
buffers and state dict keys; the others are listed with their reasons;
unfuse gives back the class each had; optimize_for_inference folds them into the convolution
before them. Everything in float64 against the original, in training and eval mode.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from fused_resnet.nn import (
    FrozenBatchNorm,
    FrozenBatchNormAct,
    FrozenBatchNormAddAct,
    FrozenBatchNormAddReLU,
    FrozenBatchNormReLU,
    freeze_batchnorm,
)
from helpers import DEVICE, import_client, make_tensor
from parity import assert_same_training, randomize_norms

torchvision = import_client("torchvision")
timm = import_client("timm")
FrozenBatchNorm2d = torchvision.ops.FrozenBatchNorm2d
FrozenBatchNormAct2d = timm.layers.FrozenBatchNormAct2d
F64 = torch.float64
X = (2, 4, 5, 6)


class DerivedFrozen(FrozenBatchNorm2d):
    """A subclass may compute something else: listed, not fused."""


class FrozenNet(nn.Module):
    """One frozen BatchNorm per case."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.tv_relu = FrozenBatchNorm2d(4)
        self.tv_add = FrozenBatchNorm2d(4)
        self.timm_relu = FrozenBatchNormAct2d(4)  # applies its ReLU itself
        self.timm_add = FrozenBatchNormAct2d(4, apply_act=False)
        self.timm_silu = FrozenBatchNormAct2d(4, act_layer=nn.SiLU)  # applies its SiLU itself
        self.ours = FrozenBatchNorm(4)
        self.two_uses = FrozenBatchNorm2d(4)
        self.derived = DerivedFrozen(4)
        self.tv_add_hardswish = FrozenBatchNorm2d(4)
        self.timm_elu = FrozenBatchNormAct2d(4, act_layer=nn.ELU)

    def forward(self, x):
        y = self.conv(x)
        a = F.relu(self.tv_relu(y))
        b = torch.relu(self.tv_add(a) + x)
        c = self.timm_relu(b)
        d = self.timm_add(c)
        d += b
        e = self.timm_silu(F.relu(d))
        f = torch.relu(self.ours(e))
        g = self.two_uses(f)
        h = F.hardswish(self.tv_add_hardswish(f) + e)
        return F.relu(g) * g + F.relu(self.derived(f)) + self.timm_elu(h)


FUSED = {
    "tv_relu": "FrozenBatchNormReLU",
    "tv_add": "FrozenBatchNormAddReLU",
    "timm_relu": "FrozenBatchNormReLU",
    "timm_add": "FrozenBatchNormAddReLU",
    "ours": "FrozenBatchNormReLU",
    "timm_silu": "FrozenBatchNormAct",
    "tv_add_hardswish": "FrozenBatchNormAddAct",
}
LEFT = {
    "two_uses": "cannot fuse: its output has 2 uses",
    "derived": "not supported: DerivedFrozen derives from a frozen BatchNorm and may compute something else",
    "timm_elu": "cannot fuse: it applies ELU, which is not fused",
}


def _frozen_net():
    torch.manual_seed(0)
    return randomize_norms(FrozenNet().to(DEVICE, F64))


def test_frozen_batchnorms_fuse_and_the_rest_is_listed():
    original = _frozen_net()
    converted, report = fused_resnet.convert(original, return_report=True)
    assert dict(report.fused) == FUSED and dict(report.left) == LEFT and report.untraced == []
    kinds = {"FrozenBatchNormReLU": FrozenBatchNormReLU, "FrozenBatchNormAddReLU": FrozenBatchNormAddReLU}
    kinds.update({"FrozenBatchNormAct": FrozenBatchNormAct, "FrozenBatchNormAddAct": FrozenBatchNormAddAct})
    for name, kind in FUSED.items():
        module = converted.get_submodule(name)
        assert type(module) is kinds[kind] and module.num_features == 4
        assert list(module.parameters()) == []
    assert (converted.timm_silu.act, converted.tv_add_hardswish.act) == ("silu", "hardswish")
    assert converted.state_dict().keys() == original.state_dict().keys()
    converted.load_state_dict(original.state_dict(), strict=True)
    original.load_state_dict(converted.state_dict(), strict=True)
    for training in (True, False):  # frozen: the same in both modes; gradients reach x and the residuals
        assert_same_training(converted, original, lambda: make_tensor(X, F64), F64, steps=2, training=training)
    for name in FUSED:
        assert all(not b.requires_grad and b.grad is None for b in converted.get_submodule(name).buffers())


def test_unfuse_gives_back_each_frozen_class():
    original = _frozen_net()
    plain = fused_resnet.unfuse(fused_resnet.convert(original))
    for (name, a), b in zip(plain.named_modules(), original.modules()):
        assert type(a) is type(b), name
        assert a.__dict__.keys() == b.__dict__.keys(), name  # num_features taken away again
    x = make_tensor(X, F64)
    assert torch.equal(plain(x), original(x))


def test_frozen_models_made_by_freeze_batchnorm_convert():
    """freeze_batchnorm on an unconverted model makes FrozenBatchNorm, which convert then fuses;
    the FrozenBatchNormReLU that freeze_batchnorm makes from a fused module unfuse refuses."""

    def eager():
        torch.manual_seed(0)
        return randomize_norms(nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).to(DEVICE, F64))

    frozen = freeze_batchnorm(eager())
    converted, report = fused_resnet.convert(frozen, return_report=True)
    assert report.fused == [("1", "FrozenBatchNormReLU")]
    assert_same_training(converted, frozen, lambda: make_tensor(X, F64), F64, steps=1)
    assert type(fused_resnet.unfuse(converted)[1]) is FrozenBatchNorm
    with pytest.raises(ValueError, match="unfuse before freezing"):
        fused_resnet.unfuse(freeze_batchnorm(fused_resnet.convert(eager())))


def test_optimize_for_inference_folds_frozen_batchnorms():
    """In eval mode a frozen BatchNorm after a convolution folds into it like an eval BatchNorm:
    fused with its add + ReLU first, it leaves AddReLU; timm's FrozenBatchNormAct2d leaves its
    activation."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), FrozenBatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), FrozenBatchNormAct2d(4)

        def forward(self, x):
            return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)) + x)))

    torch.manual_seed(0)
    net = randomize_norms(Net().to(DEVICE, F64)).eval()
    fast, report = fused_resnet.optimize_for_inference(net, return_report=True)
    assert report.folded == [("bn1", "conv1"), ("bn2", "conv2")] and report.left == []
    assert report.fused == [] and type(fast.bn1) is fused_resnet.nn.AddReLU and type(fast.bn2) is nn.ReLU
    x = make_tensor(X, F64)
    torch.testing.assert_close(fast(x), net(x), atol=1e-12, rtol=1e-10)
