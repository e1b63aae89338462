"""The models users convert whose activations are not ReLUs, as their libraries build them:
torchvision's and timm's MobileNetV2/V3 and EfficientNet (ReLU6, Hardswish, SiLU, inverted
residuals: an add with no activation after it), timm's CSPDarkNet (LeakyReLU), and a YOLO-style
detector stack written here (conv, BatchNorm, SiLU; C2f; RepConv). Every BatchNorm that can fuse
is fused (the counts below are counted by hand from the models' code), the rest is listed with
its reason, and the converted model computes what the original computes in float64: outputs, all
gradients, running statistics and parameters over SGD steps in training, and in eval mode
(relative to the largest value, 1e-6: parity.py); unfuse gives the original back, and
optimize_for_inference folds every BatchNorm that follows a convolution.

Counted from the models' code (torchvision 0.29, timm 1.0):
- torchvision mobilenet_v2: 52 BatchNorms = features.0 (Conv2dNormActivation, ReLU6) + 17
  InvertedResidual blocks (the first, t=1, without the expansion: dw + project; the other 16:
  expand + dw + project) + features.18 (ReLU6): 1 + 2 + 48 + 1. ReLU6 follows 35 of them (every
  expand and dw, the first and the last): 35 BatchNormAct2d. The project BatchNorm (conv.2 / conv.3,
  no activation) is added to the block's input in the 10 blocks with stride 1 and as many
  channels in as out (`x + self.conv(x)`; per stage n - 1 of n = 1, 2, 3, 4, 3, 3, 1: 0 + 1 + 2 +
  3 + 2 + 2 + 0): 10 BatchNormAddAct2d (identity). The 7 other project BatchNorms are the block's
  output, the next block's input: 45 fused, 7 left.
- torchvision mobilenet_v3_large: 46 = stem (Hardswish) + 15 blocks (the first without the
  expansion: 2, the others 3: 44) + the last conv (Hardswish). Activations after 31: ReLU in
  blocks 1-6 (block 1's dw, 2 each in blocks 2-6: 11 BatchNormReLU2d), Hardswish in blocks 7-15
  (18) plus stem and last (20 BatchNormAct2d). The project BatchNorm takes `result += input` in
  the 10 blocks with stride 1 and as many channels in as out (1, 3, 5, 6, 8, 9, 10, 12, 14, 15):
  41 fused, 5 left (blocks 2, 4, 7, 11, 13).
- torchvision efficientnet_b0: 49 = stem + 16 MBConv (the first: dw + project; 15 x 3) + the
  last conv; SiLU after 33 (stem, last, each expand and dw). The 9 residual blocks (n - 1 per
  stage of 1, 2, 2, 3, 3, 4, 1) apply StochasticDepth(p > 0) between the project BatchNorm and
  `result += input`: it drops in training, so nothing fuses there; 7 projects end their block:
  33 fused, 16 left. With stochastic_depth_prob=0 the StochasticDepth layers pass their input
  through and the 9 adds fuse: 42 fused, 7 left (the model this file trains).
- timm efficientnet_b0: the same 49, as BatchNormAct2d (SiLU in 33: each fuses by itself;
  bn2/bn3 apply none, apply_act=False); drop_path is nn.Identity (drop_path_rate 0), so the 9
  `x = self.drop_path(x) + shortcut` fuse: 42 fused, 7 left.
- timm mobilenetv3_large_100: 46 = stem bn1 + 15 blocks (the first a DepthwiseSeparableConv: bn1,
  bn2; 14 InvertedResidual x 3) + the last stage's ConvBnAct (960 channels; the head's conv_head
  has no BatchNorm): as torchvision's, 31 apply their activation (11 ReLU, 20 Hardswish), 10
  project BatchNorms take the add, 5 are left.
- timm cspdarknet53: 67 BatchNormAct2d, every one applying LeakyReLU(0.01) itself = stem + 5
  CrossStages x (conv_down, conv_exp, conv_transition_b, conv_transition: 4) + 2 per DarkBlock
  (depths 1, 2, 8, 8, 4: 23 blocks): 1 + 20 + 46. The blocks add after conv2's activation, so
  nothing else fuses: 67 fused, none left.
- yolo (below): 10 BatchNorms. The 7 Conv (conv, BatchNorm, SiLU) outside RepConv fuse with the
  SiLU. RepConv: act(conv1(x) + conv2(x) + bn(x)), conv1/conv2 Conv(act=False) ending in the
  nn.Identity: conv2.bn takes the first add, with no activation (the sum goes to the second add),
  since x is read again (by conv2) between conv1.bn and the add (listed with the other operand's
  reason), and so between bn and the second add: 8 fused, 2 left. C2f's forward iterates over a
  Proxy (`list(...chunk(2, 1))`): torch.fx cannot trace it, its Convs convert on their own.
"""

import pytest
import torch
from torch import nn

import fused_resnet
from helpers import DEVICE, import_client, make_tensor
from parity import assert_same_training, randomize_norms

pytestmark = pytest.mark.usefixtures("one_thread")  # whole models: see conftest.py

torchvision = import_client("torchvision")
timm = import_client("timm")
tv = torchvision.models
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# A YOLO-style detector stack, as ultralytics writes its modules (their training form).


class Conv(nn.Module):
    """conv, BatchNorm, SiLU: one nn.SiLU shared by every Conv, as ultralytics' class attribute
    default_act is."""

    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class YoloBottleneck(nn.Module):
    def __init__(self, c1, c2, shortcut=True):
        super().__init__()
        self.cv1 = Conv(c1, c2, 3)
        self.cv2 = Conv(c2, c2, 3)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, c1, c2, n=1, shortcut=False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(YoloBottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class RepConv(nn.Module):
    default_act = nn.SiLU()

    def __init__(self, c1, c2):
        super().__init__()
        self.act = self.default_act
        self.bn = nn.BatchNorm2d(c1) if c1 == c2 else None
        self.conv1 = Conv(c1, c2, 3, act=False)
        self.conv2 = Conv(c1, c2, 1, act=False)

    def forward(self, x):
        id_out = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + id_out)


def _yolo():
    return nn.Sequential(
        Conv(3, 8, 3, 2), Conv(8, 16, 3, 2), C2f(16, 16, 1, shortcut=True), Conv(16, 32, 3, 2), RepConv(32, 32),
        nn.Conv2d(32, 10, 1),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The models.

IMAGE, SMALL = (4, 3, 64, 64), (2, 3, 64, 64)
NO_DROPOUT = dict(num_classes=10, dropout=0.0)


def _goes_to(next_module):
    return f"cannot fuse: its output goes to {next_module}, not to an activation or an add"


def _tv_efficientnet_left():
    """torchvision efficientnet_b0's 16: the 7 that end their block, the 9 before StochasticDepth."""
    left = {"features.1.0.block.2.1": _goes_to("features.2 (Sequential)")}
    for stage, blocks in ((2, 2), (3, 2), (4, 3), (5, 3), (6, 4)):
        left[f"features.{stage}.0.block.3.1"] = _goes_to(f"features.{stage}.1 (MBConv)")
        for block in range(1, blocks):
            left[f"features.{stage}.{block}.block.3.1"] = _goes_to(
                f"features.{stage}.{block}.stochastic_depth (StochasticDepth)"
            )
    left["features.7.0.block.3.1"] = _goes_to("features.8 (Conv2dNormActivation)")
    return left


def _tv_efficientnet_b0_no_drop_left():
    return {k: v for k, v in _tv_efficientnet_left().items() if "stochastic_depth" not in v}


# name: (factory, input, {fused class: count}, {left BatchNorm: reason}); train: whether
# assert_same_training trains it (a model that draws random masks in training does not).
MODELS = {
    "tv.mobilenet_v2": (
        lambda: tv.mobilenet_v2(**NO_DROPOUT), IMAGE, {"BatchNormAct2d": 35, "BatchNormAddAct2d": 10},
        {
            "features.1.conv.2": _goes_to("features.2 (InvertedResidual)"),
            **{f"features.{i}.conv.3": _goes_to(f"features.{i + 1} (InvertedResidual)") for i in (2, 4, 7, 11, 14)},
            "features.17.conv.3": _goes_to("features.18 (Conv2dNormActivation)"),
        },
    ),
    "tv.mobilenet_v3_large": (
        lambda: tv.mobilenet_v3_large(**NO_DROPOUT), IMAGE,
        {"BatchNormReLU2d": 11, "BatchNormAct2d": 20, "BatchNormAddAct2d": 10},
        {
            **{f"features.{i}.block.2.1": _goes_to(f"features.{i + 1} (InvertedResidual)") for i in (2, 7)},
            **{f"features.{i}.block.3.1": _goes_to(f"features.{i + 1} (InvertedResidual)") for i in (4, 11, 13)},
        },
    ),
    "tv.efficientnet_b0": (
        lambda: tv.efficientnet_b0(num_classes=10), IMAGE, {"BatchNormAct2d": 33}, _tv_efficientnet_left()
    ),
    "tv.efficientnet_b0_no_drop": (
        lambda: tv.efficientnet_b0(stochastic_depth_prob=0.0, **NO_DROPOUT), IMAGE,
        {"BatchNormAct2d": 33, "BatchNormAddAct2d": 9}, _tv_efficientnet_b0_no_drop_left(),
    ),
    "timm.efficientnet_b0": (
        lambda: timm.create_model("efficientnet_b0", num_classes=10), IMAGE,
        {"BatchNormAct2d": 33, "BatchNormAddAct2d": 9},
        {
            "blocks.0.0.bn2": _goes_to("blocks.1 (Sequential)"),
            **{f"blocks.{i}.0.bn3": _goes_to(f"blocks.{i}.1 (InvertedResidual)") for i in range(1, 6)},
            "blocks.6.0.bn3": _goes_to("conv_head (Conv2d)"),
        },
    ),
    "timm.mobilenetv3_large_100": (
        lambda: timm.create_model("mobilenetv3_large_100", num_classes=10), IMAGE,
        {"BatchNormReLU2d": 11, "BatchNormAct2d": 20, "BatchNormAddAct2d": 10},
        {f"blocks.{i}.0.bn3": _goes_to(f"blocks.{i}.1 (InvertedResidual)") for i in range(1, 6)},
    ),
    "timm.cspdarknet53": (lambda: timm.create_model("cspdarknet53", num_classes=10), SMALL, {"BatchNormAct2d": 67}, {}),
    "yolo": (
        _yolo, SMALL, {"BatchNormAct2d": 7, "BatchNormAddAct2d": 1},
        {
            "4.bn": "not supported: its input is used again between the BatchNorm and the add",
            "4.conv1.bn": "cannot fuse: the other operand of its add, 4.conv2.bn, takes the add "
            "(one BatchNorm per add)",
        },
    ),
}  # fmt: skip
ACTS = {  # the activation each fused module applies, by model
    "tv.mobilenet_v2": {"relu6", "identity"},
    "tv.mobilenet_v3_large": {"relu", "hardswish", "identity"},
    "tv.efficientnet_b0": {"silu"},
    "tv.efficientnet_b0_no_drop": {"silu", "identity"},
    "timm.efficientnet_b0": {"silu", "identity"},
    "timm.mobilenetv3_large_100": {"relu", "hardswish", "identity"},
    "timm.cspdarknet53": {"leaky_relu"},
    "yolo": {"silu", "identity"},
}
RANDOM_IN_TRAINING = {"tv.efficientnet_b0"}  # StochasticDepth(p > 0)
UNTRACED = {"yolo": ["2"]}  # C2f
NOT_FOLDED = {"yolo": ["4.bn"]}  # RepConv's BatchNorm of its input: no convolution before it


def _batchnorms(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name", MODELS)
def test_every_fusable_batchnorm_is_fused(name):
    factory, _, fused, left = MODELS[name]
    model = factory()
    converted, report = fused_resnet.convert(model, return_report=True)
    counts = {}
    for _, cls in report.fused:
        counts[cls] = counts.get(cls, 0) + 1
    assert counts == fused and dict(report.left) == left
    assert [n for n, _ in report.untraced] == UNTRACED.get(name, [])
    assert sorted(n for n, _ in report.fused + report.left) == sorted(_batchnorms(model)), "every BatchNorm listed"
    assert {converted.get_submodule(n).act for n, _ in report.fused} == ACTS[name]
    if name == "timm.cspdarknet53":
        assert {converted.get_submodule(n).negative_slope for n, _ in report.fused} == {0.01}
    assert converted.state_dict().keys() == model.state_dict().keys()
    converted.load_state_dict(model.state_dict(), strict=True)
    assert all(not type(m).__module__.startswith("fused_resnet") for m in model.modules()), "original untouched"


@pytest.mark.parametrize("name", [n for n in MODELS if n not in RANDOM_IN_TRAINING])
def test_converted_model_trains_and_evaluates_like_the_original(name):
    """In eval mode after the training steps, a depthwise convolution's channel may have a small
    running variance that amplifies the rounding differences of training: a smaller step than the
    ResNets' keeps them within the tolerance."""
    factory, shape, _, _ = MODELS[name]
    torch.manual_seed(0)
    original = randomize_norms(factory().to(DEVICE, F64))
    converted = fused_resnet.convert(original)
    for training in (True, False):
        assert_same_training(
            converted, original, lambda: make_tensor(shape, F64), F64, steps=2 if training else 1, lr=0.01,
            training=training,
        )  # fmt: skip


@pytest.mark.parametrize("name", [n for n in MODELS if n != "tv.efficientnet_b0"])  # eval: as _no_drop
def test_unfuse_and_optimize_for_inference(name):
    """unfuse gives back every module's class and attributes (timm's BatchNormAct2d its own
    activation) and the same output, exactly. optimize_for_inference folds every BatchNorm that
    follows a convolution (all but NOT_FOLDED) and computes what the eval-mode model computes;
    unfused again, it computes the same (its folded activations and adds become nn.Identity under
    the original forwards, which apply them)."""
    factory, shape, _, _ = MODELS[name]
    torch.manual_seed(0)
    original = randomize_norms(factory().to(DEVICE, F64)).eval()
    x = make_tensor(shape, F64)
    with torch.no_grad():
        expected = original(x)
        plain = fused_resnet.unfuse(fused_resnet.convert(original))
        for (module_name, a), b in zip(plain.named_modules(), original.modules()):
            assert type(a) is type(b), module_name
            assert a.__dict__.keys() == b.__dict__.keys(), module_name
        assert torch.equal(plain(x), expected)
        optimized, report = fused_resnet.optimize_for_inference(original, return_report=True)
        not_folded = NOT_FOLDED.get(name, [])
        assert sorted(n for n, _ in report.folded) == sorted(set(_batchnorms(original)) - set(not_folded))
        assert _batchnorms(optimized) == [n for n, _ in report.fused + report.left] == not_folded
        torch.testing.assert_close(optimized(x), expected, atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(fused_resnet.unfuse(optimized)(x), expected, atol=1e-10, rtol=1e-8)
