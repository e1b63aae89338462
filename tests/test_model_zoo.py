"""The models users convert: torchvision's 2D and video ResNets and RegNets, and timm's ResNets
and RegNets, as their libraries build them, with trainable and with frozen BatchNorms
(torchvision's FrozenBatchNorm2d, the norm_layer of pretrained detection backbones; timm's
freeze_batch_norm_2d). Every BatchNorm that can fuse is fused (the counts below are counted by
hand from the models' code), the rest is listed with its reason, and the converted model
computes what the original computes in float64: outputs, all gradients, running statistics and
parameters over SGD steps in training, and in eval mode.

Inputs are as small as keeps every BatchNorm well conditioned: a training-mode BatchNorm over a
handful of values per channel amplifies rounding differences far beyond float64's resolution.
"""

import pytest
import torch
from torch import nn

import fused_resnet
from helpers import DEVICE, import_client, make_tensor
from parity import assert_same_training, calibrate_frozen, randomize_norms

pytestmark = pytest.mark.usefixtures("one_thread")  # whole models: see conftest.py

torchvision = import_client("torchvision")
timm = import_client("timm")
tv = torchvision.models
FROZEN_NORMS = (torchvision.ops.FrozenBatchNorm2d, timm.layers.FrozenBatchNormAct2d)

# name: (factory, input shape, fused, left). Counted from the models' code:
# - torchvision resnet18: 20 BatchNorms = stem bn1 + 8 BasicBlocks x (bn1, bn2) + 3 downsample
#   BatchNorms. bn1s fuse with their ReLU, bn2s with `out += identity` + ReLU; a downsample
#   BatchNorm is the other operand of that add: 17 fused, 3 left.
# - torchvision resnet50: 53 = 1 + 16 Bottlenecks x 3 + 4 downsample: 49 fused, 4 left.
# - r3d_18, mc3_18: 20 = stem + 8 x (conv1's, conv2's: the last layer of conv1/conv2 =
#   Sequential(conv, BatchNorm3d[, ReLU])) + 3 downsample: 17 fused, 3 left.
# - r2plus1d_18: 37 = stem 2 + 8 x (2 inside the Conv2Plus1D's + conv1's + conv2's) + 3: 34, 3.
# - timm resnet18 (drop_block = nn.Identity between bn1 and act1): as torchvision's, 17 and 3.
# - timm resnet50: as torchvision's (nn.Identity between bn2 and act2), 49 and 4.
# - timm resnet50d: deep stem (2 BatchNorms in model.conv1, then model.bn1), downsample =
#   Sequential(AvgPool2d, conv, BatchNorm2d): 55 = 3 + 48 + 4: 51 fused, 4 left.
# - timm seresnet50: bn3's output goes to the SE module (cannot fuse, 16); the downsample
#   BatchNorm then takes the add with the SE output as residual: 53 = 1 + 32 + 16 + 4: 37, 16.
# - timm skresnet18: 12 BatchNorm2d (stem, 8 in the selective-kernel attention, 3 downsample) and
#   24 BatchNormAct2d (8 x 2 kernel paths that apply their ReLU, 8 conv2 without activation that
#   take `x += shortcut` + ReLU): 36 = 33 fused + 3 left (downsample).
# - torchvision regnet_y_400mf: stages of depth 1, 3, 6, 6 (16 ResBottleneckBlocks); a block is
#   f = BottleneckTransform(a, b, se, c), each of a, b, c a Conv2dNormActivation (conv, BatchNorm
#   at index 1, ReLU for a and b, none for c), and the first block of each stage has
#   proj = Conv2dNormActivation(conv, BatchNorm) too. 53 = stem + 16 x 3 + 4 proj. a.1 and b.1
#   fuse with their ReLU (the SE block reads b's ReLU output); c.1 is the last layer of f and the
#   block writes `x = x + self.f(x)` (a new tensor), or `x = self.proj(x) + self.f(x)`, then its
#   ReLU: f.c.1 takes the add in every block. proj.1 is the other operand (f reads x again before
#   the add): 49 fused, 4 left.
# - regnet_x_400mf: depths 1, 2, 7, 12 (22 blocks, no SE), the same layout: 71 = 1 + 66 + 4,
#   67 fused, 4 left.
# - timm regnety_002: depths 1, 1, 4, 7 (13 blocks) of ConvNormAct (BatchNormAct2d) conv1, conv2
#   (ReLU: each fuses by itself), se, conv3 (no activation), then `drop_path(x) +
#   downsample(shortcut)` and act3; downsample is a ConvNormAct without activation in the first
#   block of each stage, nn.Identity in the others: 44 = stem + 13 x 3 + 4: 40 fused, 4 left.
# - frozen: torchvision resnet50(norm_layer=FrozenBatchNorm2d) counts as resnet50 (49 and 4, into
#   FrozenBatchNormReLU / FrozenBatchNormAddReLU); timm's freeze_batch_norm_2d turns regnety_002's
#   44 BatchNormAct2d into FrozenBatchNormAct2d: as regnety_002, 40 and 4.
# Clips small enough that the 3D ResNets train in float64 in seconds; their last stage still
# sees 2x2 positions per clip (24 -> 12 -> 6 -> 3 -> 2), 8 values per channel.
IMAGE, CLIP = (4, 3, 64, 64), (2, 3, 4, 24, 24)


def _frozen_resnet50():
    return tv.resnet50(num_classes=10, norm_layer=torchvision.ops.FrozenBatchNorm2d)


def _frozen_regnety_002():
    return timm.layers.freeze_batch_norm_2d(timm.create_model("regnety_002", num_classes=10))


MODELS = {
    "tv.resnet18": (lambda: tv.resnet18(num_classes=10), IMAGE, 17, 3),
    "tv.resnet50": (lambda: tv.resnet50(num_classes=10), IMAGE, 49, 4),
    "tv.r3d_18": (lambda: tv.video.r3d_18(num_classes=10), CLIP, 17, 3),
    "tv.mc3_18": (lambda: tv.video.mc3_18(num_classes=10), CLIP, 17, 3),
    "tv.r2plus1d_18": (lambda: tv.video.r2plus1d_18(num_classes=10), CLIP, 34, 3),
    "timm.resnet18": (lambda: timm.create_model("resnet18", num_classes=10), IMAGE, 17, 3),
    "timm.resnet50": (lambda: timm.create_model("resnet50", num_classes=10), IMAGE, 49, 4),
    "timm.resnet50d": (lambda: timm.create_model("resnet50d", num_classes=10), IMAGE, 51, 4),
    "timm.seresnet50": (lambda: timm.create_model("seresnet50", num_classes=10), IMAGE, 37, 16),
    "timm.skresnet18": (lambda: timm.create_model("skresnet18", num_classes=10), IMAGE, 33, 3),
    "tv.regnet_y_400mf": (lambda: tv.regnet_y_400mf(num_classes=10), IMAGE, 49, 4),
    "tv.regnet_x_400mf": (lambda: tv.regnet_x_400mf(num_classes=10), IMAGE, 67, 4),
    "timm.regnety_002": (lambda: timm.create_model("regnety_002", num_classes=10), IMAGE, 40, 4),
    "tv.frozen_resnet50": (_frozen_resnet50, IMAGE, 49, 4),
    "timm.frozen_regnety_002": (_frozen_regnety_002, IMAGE, 40, 4),
}
FROZEN_MODELS = ["tv.frozen_resnet50", "timm.frozen_regnety_002"]
ONE_PER_ADD = "cannot fuse: the other operand of its add, "


def _batchnorms(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm,) + FROZEN_NORMS)]


def _expected_reason(model_name, norm_name):
    block = norm_name.rsplit(".", 2)[0]  # layerK.0 of layerK.0.downsample.1
    if model_name == "timm.seresnet50":
        se = f"{norm_name.rsplit('.', 1)[0]}.se"
        return f"cannot fuse: its output goes to {se} (SEModule), not to an activation or an add"
    last = {"resnet50": "bn3", "resnet50d": "bn3", "r3d_18": "conv2.1", "mc3_18": "conv2.1"}
    last.update({"r2plus1d_18": "conv2.1", "skresnet18": "conv2.bn", "frozen_resnet50": "bn3"})
    last.update({"regnet_y_400mf": "f.c.1", "regnet_x_400mf": "f.c.1"})
    last.update({"regnety_002": "conv3.bn", "frozen_regnety_002": "conv3.bn"})
    takes_add = f"{block}.{last.get(model_name.split('.')[1], 'bn2')}"
    return f"{ONE_PER_ADD}{takes_add}, takes the add (one BatchNorm per add)"


@pytest.mark.parametrize("name", MODELS)
def test_every_fusable_batchnorm_is_fused(name):
    factory, _, fused, left = MODELS[name]
    model = factory()
    converted, report = fused_resnet.convert(model, return_report=True)
    assert (len(report.fused), len(report.left), report.untraced) == (fused, left, [])
    assert sorted(n for n, _ in report.fused + report.left) == sorted(_batchnorms(model)), "every BatchNorm listed"
    for norm, reason in report.left:
        assert reason == _expected_reason(name, norm), norm
    assert converted.state_dict().keys() == model.state_dict().keys()
    converted.load_state_dict(model.state_dict(), strict=True)
    assert all(not type(m).__module__.startswith("fused_resnet") for m in model.modules()), "original untouched"
    if name in FROZEN_MODELS:
        assert {cls for _, cls in report.fused} == {"FrozenBatchNormReLU", "FrozenBatchNormAddReLU"}


@pytest.mark.parametrize("name", MODELS)
def test_converted_model_trains_and_evaluates_like_the_original(name):
    factory, shape, _, _ = MODELS[name]
    torch.manual_seed(0)
    original = randomize_norms(factory().to(DEVICE, torch.float64))
    calibrate_frozen(original, make_tensor(shape, torch.float64))  # no-op without frozen BatchNorms
    converted = fused_resnet.convert(original)
    # No batch statistics renormalize a frozen model after an SGD step: a smaller one keeps it finite.
    lr = 1e-3 if name in FROZEN_MODELS else 0.05
    for training in (True, False):
        assert_same_training(
            converted, original, lambda: make_tensor(shape, torch.float64), torch.float64, steps=2 if training else 1,
            lr=lr, training=training,
        )  # fmt: skip


@pytest.mark.parametrize("name", FROZEN_MODELS)
def test_unfuse_gives_back_the_frozen_batchnorms(name):
    """unfuse makes each fused frozen module the torchvision or timm class it was, attributes
    and buffers included: the model computes exactly what the original computes."""
    torch.manual_seed(0)
    x = make_tensor((2, 3, 64, 64), torch.float64)
    original = calibrate_frozen(randomize_norms(MODELS[name][0]().to(DEVICE, torch.float64)).eval(), x)
    plain = fused_resnet.unfuse(fused_resnet.convert(original))
    for (name_a, a), (name_b, b) in zip(plain.named_modules(), original.named_modules()):
        assert (name_a, type(a)) == (name_b, type(b))
        assert a.__dict__.keys() == b.__dict__.keys(), name_a
    assert plain.state_dict().keys() == original.state_dict().keys()
    assert torch.equal(plain(x), original(x))


def test_seed_004_torchvision_resnet18_as_written():
    """Seed 004: `from torchvision.models.resnet import resnet18; resnet18 = resnet18()`."""
    from torchvision.models.resnet import resnet18

    torch.manual_seed(0)
    resnet18 = resnet18()
    print(resnet18)
    original = randomize_norms(resnet18.to(DEVICE, torch.float64))
    converted, report = fused_resnet.convert(original, return_report=True)
    assert len(report.fused) == 17
    assert_same_training(converted, original, lambda: make_tensor((2, 3, 96, 96), torch.float64), torch.float64, steps=2)


def test_unfuse_gives_plain_modules_for_third_party_tools():
    """A converted model, unfused, is the original again: timm's freeze_batch_norm_2d then
    freezes every BatchNorm of it exactly as of the original (on a fused model it would drop
    the ReLUs)."""
    torch.manual_seed(0)
    original = randomize_norms(timm.create_model("resnet18", num_classes=10).to(DEVICE, torch.float64)).eval()
    converted = fused_resnet.convert(original)
    plain = fused_resnet.unfuse(converted)
    for a, b in zip(plain.modules(), original.modules()):
        assert type(a) is type(b)
    assert plain.state_dict().keys() == original.state_dict().keys()
    x = make_tensor(IMAGE, torch.float64)
    frozen = timm.layers.freeze_batch_norm_2d(plain)
    frozen_original = timm.layers.freeze_batch_norm_2d(original)
    torch.testing.assert_close(frozen(x), frozen_original(x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ["resnet18", "skresnet18"])
def test_other_activations_fuse_as_the_relu_does(name):
    """With act_layer="silu" the same BatchNorms fuse as with the ReLU (17 and 33, the 3
    downsample ones left), into the Act classes, except skresnet18's selective-kernel attention,
    which keeps its own ReLU (8). With act_layer="elu", which has no fused form, only those 8
    fuse, and every other reason names the ELU: the BatchNorm's output goes to it, or the
    BatchNorm applies it (timm's BatchNormAct2d); an add whose sum goes to it fuses without it
    (BatchNormAddAct2d with act="identity")."""
    relu_model = timm.create_model(name, num_classes=10)
    silu_model = timm.create_model(name, num_classes=10, act_layer="silu")
    _, relu_report = fused_resnet.convert(relu_model, return_report=True)
    _, report = fused_resnet.convert(silu_model, return_report=True)
    assert report.untraced == [] and [n for n, _ in report.fused] == [n for n, _ in relu_report.fused]
    assert report.left == relu_report.left
    relu_classes = dict(relu_report.fused)
    for norm, fused_class in report.fused:
        expected = relu_classes[norm] if norm.endswith(".attn.bn") else relu_classes[norm].replace("ReLU", "Act")
        assert fused_class == expected, norm

    elu_model = timm.create_model(name, num_classes=10, act_layer="elu")
    converted, report = fused_resnet.convert(elu_model, return_report=True)
    assert report.untraced == []
    attention = [n for n, _ in report.fused if n.endswith(".attn.bn")]
    adds = [n for n, cls in report.fused if cls == "BatchNormAddAct2d"]
    assert len(attention) == (8 if name == "skresnet18" else 0) and len(attention) + len(adds) == len(report.fused)
    assert len(adds) == 8 and all(converted.get_submodule(n).act == "identity" for n in adds)  # each block's add
    assert sorted(n for n, _ in report.left + report.fused) == sorted(_batchnorms(elu_model))
    for norm, reason in report.left:
        if not reason.startswith(ONE_PER_ADD):
            assert reason.startswith("cannot fuse: ") and "(ELU), which is not fused" in reason or (
                reason == "cannot fuse: it applies ELU, which is not fused"
            ), (norm, reason)
