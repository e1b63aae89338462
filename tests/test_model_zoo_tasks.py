"""torchvision's segmentation and detection models, as users fine-tune them: a ResNet-50 backbone
wrapped in IntermediateLayerGetter (an nn.ModuleDict with a forward of its own), with trainable
BatchNorms or, as every pretrained detection backbone has them, torchvision's FrozenBatchNorm2d.
Every fusable BatchNorm is fused, heads included, the rest is listed with its reason, and the
converted model computes what the original computes in float64: the segmentation models' outputs,
gradients and states over an SGD step in training and in eval mode; the detection models' detections
in eval mode (their training forward needs targets and samples proposals at random), and the
backbone's features, gradients and states over an SGD step in training (Faster R-CNN's, trainable
and frozen: Mask R-CNN and RetinaNet build the same backbone with the same function).

Counted by hand from torchvision's code:
- The ResNet-50 backbone: 53 BatchNorms = the stem's bn1 + 16 Bottlenecks x (bn1, bn2, bn3) + 4
  downsample.1. The stem's bn1 fuses with the relu that IntermediateLayerGetter's forward calls
  next, bn1/bn2 with their ReLU, bn3 with `out += identity` + ReLU; each downsample.1 is the other
  operand of that add: 49 fused, 4 left. Frozen, the same 49 and 4.
- fcn_resnet50(aux_loss=True): + FCNHead classifier and aux_classifier, each Sequential(conv,
  BatchNorm, ReLU, Dropout, conv): 55 BatchNorms, 51 fused, 4 left.
- deeplabv3_resnet50: + DeepLabHead = Sequential(ASPP, conv, BatchNorm, ReLU, conv); ASPP holds
  convs = [Sequential(conv, BatchNorm, ReLU), 3 ASPPConv (conv, BatchNorm, ReLU), ASPPPooling
  (pool, conv, BatchNorm, ReLU)] and project = Sequential(conv, BatchNorm, ReLU, Dropout): 7
  BatchNorms, each before its ReLU: 60 BatchNorms, 56 fused, 4 left.
- fasterrcnn / maskrcnn / retinanet_resnet50_fpn: the FPN, the RPN and the box, mask and class
  heads of these (v1) models hold no BatchNorm: 53, 49 fused, 4 left. The model's own forward
  (GeneralizedRCNN, RetinaNet: a loop over the images) is reported untraced; it calls no
  BatchNorm itself.
"""

import pytest
import torch
from torch import nn

import fused_resnet
from helpers import DEVICE, import_client, make_tensor
from parity import assert_close_at_scale, assert_same_training, calibrate_frozen, randomize_norms

pytestmark = pytest.mark.usefixtures("one_thread")  # whole models: see conftest.py

torchvision = import_client("torchvision")
segmentation, detection = torchvision.models.segmentation, torchvision.models.detection
FrozenBatchNorm2d = torchvision.ops.FrozenBatchNorm2d
F64 = torch.float64
IMAGE = (2, 3, 64, 64)  # the detection backbone's: layer4 gives 2 x 2 x 2 values per channel
SEGMENTATION_IMAGE = (2, 3, 16, 16)  # output stride 8: layer4 gives 2 x 2 x 2

# Small inputs and few proposals and detections keep a detection model's eval fast; score
# thresholds of 0 keep detections coming from untrained heads (whose scores sit near 0.01).
RCNN = dict(min_size=64, max_size=64, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)
RCNN.update(box_score_thresh=0.0, box_detections_per_img=8)
RETINANET = dict(min_size=64, max_size=64, topk_candidates=50, score_thresh=0.0, detections_per_img=8)
NO_WEIGHTS = dict(weights=None, weights_backbone=None, num_classes=3)


def _frozen_fasterrcnn():
    """What fasterrcnn_resnet50_fpn builds with pretrained backbone weights: FrozenBatchNorm2d
    throughout, conv1 and layer1 not trained."""
    backbone = detection.backbone_utils.resnet_fpn_backbone(
        backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
    )
    return detection.FasterRCNN(backbone, num_classes=3, **RCNN)


# name: (factory, BatchNorms, fused)
SEGMENTATION = {
    "fcn_resnet50": (lambda: segmentation.fcn_resnet50(aux_loss=True, **NO_WEIGHTS), 55, 51),
    "deeplabv3_resnet50": (lambda: segmentation.deeplabv3_resnet50(**NO_WEIGHTS), 60, 56),
}
DETECTION = {
    "fasterrcnn_resnet50_fpn": (lambda: detection.fasterrcnn_resnet50_fpn(**NO_WEIGHTS, **RCNN), 53, 49),
    "maskrcnn_resnet50_fpn": (lambda: detection.maskrcnn_resnet50_fpn(**NO_WEIGHTS, **RCNN), 53, 49),
    "retinanet_resnet50_fpn": (lambda: detection.retinanet_resnet50_fpn(**NO_WEIGHTS, **RETINANET), 53, 49),
    "frozen_fasterrcnn_resnet50_fpn": (_frozen_fasterrcnn, 53, 49),
}
TRAINED_BACKBONES = ("fasterrcnn_resnet50_fpn", "frozen_fasterrcnn_resnet50_fpn")


class Concatenated(nn.Module):
    """A model whose output is a dict of tensors, as one tensor, for assert_same_training."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.cat([value.flatten(1) for value in self.model(x).values()], dim=1)


def _prepare(factory):
    """The model in float64 with random statistics (frozen ones calibrated) and no dropout: two
    models in training mode would draw different masks."""
    torch.manual_seed(0)
    model = randomize_norms(factory().to(DEVICE, F64))
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    backbone = model.backbone.body if hasattr(model.backbone, "body") else model.backbone
    calibrate_frozen(backbone, make_tensor(IMAGE, F64))
    return model


def _check_report(model, report, norms, fused):
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))]
    assert (len(names), len(report.fused)) == (norms, fused)
    assert sorted(n for n, _ in report.fused + report.left) == sorted(names), "every BatchNorm listed"
    prefix = "backbone.body." if hasattr(model.backbone, "body") else "backbone."
    assert f"{prefix}bn1" in dict(report.fused), "the stem, called by IntermediateLayerGetter's forward"
    for name, reason in report.left:
        block = name.rsplit(".", 2)[0]  # backbone.layerK.0 of backbone.layerK.0.downsample.1
        assert name.endswith(".0.downsample.1"), name
        takes_it = f"{block}.bn3"
        assert reason == f"cannot fuse: the other operand of its add, {takes_it}, takes the add (one BatchNorm per add)"


@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_model_converts_and_trains_like_the_original(name):
    factory, norms, fused = SEGMENTATION[name]
    original = _prepare(factory)
    converted, report = fused_resnet.convert(original, return_report=True)
    _check_report(original, report, norms, fused)
    assert report.untraced == []
    for training in (True, False):
        assert_same_training(
            Concatenated(converted), Concatenated(original), lambda: make_tensor(SEGMENTATION_IMAGE, F64), F64,
            steps=1, training=training,
        )  # fmt: skip


def _assert_same_detections(converted, original, images):
    with torch.no_grad():
        found, expected = converted(images), original(images)
    assert len(found) == len(expected) == len(images)
    assert sum(len(d["labels"]) for d in expected) > 0, "no detections to compare"
    for mine, theirs in zip(found, expected):
        assert mine.keys() == theirs.keys()
        assert torch.equal(mine["labels"], theirs["labels"])
        for key in mine.keys() - {"labels"}:
            assert_close_at_scale(mine[key], theirs[key], F64, key)


@pytest.mark.parametrize("name", DETECTION)
def test_detection_model_converts_and_detects_like_the_original(name):
    factory, norms, fused = DETECTION[name]
    original = _prepare(factory)
    converted, report = fused_resnet.convert(original.eval(), return_report=True)
    _check_report(original, report, norms, fused)
    assert [n for n, _ in report.untraced] == [""]
    frozen = name.startswith("frozen")
    kinds = {"FrozenBatchNormReLU", "FrozenBatchNormAddReLU"} if frozen else {"BatchNormReLU2d", "BatchNormAddReLU2d"}
    assert {cls for _, cls in report.fused} == kinds
    _assert_same_detections(converted, original, [make_tensor((3, 64, 64), F64), make_tensor((3, 40, 64), F64)])
    if name not in TRAINED_BACKBONES:
        return
    # The backbone in training mode: its FPN features, gradients and states over an SGD step.
    assert_same_training(
        Concatenated(converted.backbone), Concatenated(original.backbone), lambda: make_tensor(IMAGE, F64), F64,
        steps=1, lr=1e-3 if frozen else 0.05,
    )  # fmt: skip
