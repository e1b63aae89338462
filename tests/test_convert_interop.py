"""A converted model among the tools users apply to models: torch.fx (symbolic_trace,
torchvision's create_feature_extractor, fx's own conv-bn fusion), torch.export, torch.jit.trace
and torch.jit.script; convert of GraphModules; convert(inplace=True) all or nothing; unfuse; and
optimize_for_inference on torchvision's video ResNets. Everything in float64 against eager."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from helpers import DEVICE, import_client, make_tensor
from fused_resnet.nn import BatchNormAddReLU2d, BatchNormReLU2d
from parity import assert_same_training, randomize_norms

torchvision = import_client("torchvision")
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

convert_module = importlib.import_module("fused_resnet.convert.fuse")
X = (2, 3, 64, 64)


def _resnet18():
    torch.manual_seed(0)
    return randomize_norms(torchvision.models.resnet18(num_classes=10).to(DEVICE, torch.float64))


def _state(model):
    """Everything a conversion could change: module objects and classes, tensors' values."""
    return (
        [(name, m, type(m)) for name, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
    )


def _assert_state(model, state):
    modules, tensors = state
    assert [(name, m, type(m)) for name, m in model.named_modules()] == modules
    now = model.state_dict(keep_vars=True)
    assert now.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(now[key], value), key


# ---------------------------------------------------------------------------------------------
# Two BatchNorm outputs added: the left one takes the add.


class TwoNormsAdded(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_s, self.bn_s = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn1(self.conv1(x)) + self.bn_s(self.conv_s(x)))


@pytest.mark.parametrize("inplace", [False, True])
def test_add_of_two_batchnorm_outputs(inplace):
    torch.manual_seed(0)
    original = randomize_norms(TwoNormsAdded().to(DEVICE, torch.float64))
    reference = TwoNormsAdded().to(DEVICE, torch.float64)
    reference.load_state_dict(original.state_dict())
    converted, report = fused_resnet.convert(original, inplace=inplace, return_report=True)
    assert (converted is original) == inplace
    assert report.fused == [("bn1", "BatchNormAddReLU2d")]
    assert report.left == [("bn_s", "cannot fuse: the other operand of its add, bn1, takes the add (one BatchNorm per add)")]
    assert_same_training(converted, reference, lambda: make_tensor((3, 3, 7, 9), torch.float64), torch.float64)


class SequentialThenAdd(nn.Module):
    """The model itself adds and applies the ReLU after a child Sequential that ends in a
    BatchNorm, behind an nn.Identity placeholder, nested twice."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)), nn.Identity())

    def forward(self, x):
        return torch.relu(self.body(x) + x)


def test_batchnorm_last_in_a_child_of_the_model_fuses_with_the_models_add():
    torch.manual_seed(0)
    original = randomize_norms(SequentialThenAdd().to(DEVICE, torch.float64))
    converted, report = fused_resnet.convert(original, return_report=True)
    assert report.fused == [("body.0.1", "BatchNormAddReLU2d")] and report.left == []
    assert_same_training(converted, original, lambda: make_tensor((2, 4, 5, 6), torch.float64), torch.float64)


def test_create_feature_extractor_graph_converts():
    """torchvision's feature-extractor GraphModule of resnet18, converted in its own graph."""
    original = _resnet18()
    extractor = create_feature_extractor(original, {"layer2": "mid", "fc": "out"})
    converted, report = fused_resnet.convert(extractor, return_report=True)
    assert isinstance(converted, torch.fx.GraphModule)
    assert (len(report.fused), len(report.left), report.untraced) == (17, 3, [])
    x = make_tensor(X, torch.float64)
    expected = extractor.eval()(x)
    actual = converted.eval()(x)
    assert actual.keys() == expected.keys() == {"mid", "out"}
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-10, rtol=1e-8)
    plain = fused_resnet.unfuse(converted)
    assert not any(isinstance(m, (BatchNormReLU2d, BatchNormAddReLU2d)) for m in plain.modules())
    assert plain.code == extractor.code


# ---------------------------------------------------------------------------------------------
# All or nothing.


def test_failed_inplace_conversion_leaves_the_model_as_it_was(monkeypatch):
    model = torchvision.models.video.r3d_18(num_classes=10).to(DEVICE)
    before = _state(model)
    x = make_tensor((1, 3, 4, 16, 16), torch.float32)
    expected = model.eval()(x)
    real_fuse, calls = convert_module._fuse, []

    def fuse_then_fail(bn, with_residual, activation):
        calls.append(bn)
        if len(calls) == 12:  # after modules were rewritten and containers spliced
            raise RuntimeError("simulated failure")
        real_fuse(bn, with_residual, activation)

    monkeypatch.setattr(convert_module, "_fuse", fuse_then_fail)
    with pytest.raises(RuntimeError, match="simulated failure"):
        fused_resnet.convert(model, inplace=True)
    _assert_state(model, before)
    assert not any(hasattr(type(m), "_fused_resnet_graph") for m in model.modules())
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


def test_failed_inplace_optimize_for_inference_restores_the_weights(monkeypatch):
    model = torchvision.models.resnet18(num_classes=10).eval()
    before = _state(model)
    monkeypatch.setattr(convert_module, "_report", lambda walk: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fused_resnet.optimize_for_inference(model, inplace=True)
    _assert_state(model, before)


# ---------------------------------------------------------------------------------------------
# torch.fx, torch.export, TorchScript.


def test_converted_model_traces_with_torch_fx():
    original = _resnet18().eval()
    converted = fused_resnet.convert(original)
    traced = torch.fx.symbolic_trace(converted)
    leaves = {node.target for node in traced.graph.nodes if node.op == "call_module"}
    assert {"bn1", "layer1.0.bn1"} <= leaves  # the fused modules are leaves
    x = make_tensor(X, torch.float64)
    torch.testing.assert_close(traced(x), original(x), atol=1e-10, rtol=1e-8)
    features = create_feature_extractor(converted, ["layer1.0.bn1", "layer3", "fc"])(x)
    expected = create_feature_extractor(original, ["layer1.0.relu", "layer3", "fc"])(x)
    torch.testing.assert_close(features["layer1.0.bn1"], expected["layer1.0.relu"], atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(features["fc"], expected["fc"], atol=1e-10, rtol=1e-8)
    from torch.fx.experimental.optimization import fuse  # folds exact nn.BatchNorm2d only

    torch.testing.assert_close(fuse(converted)(x), original(x), atol=1e-10, rtol=1e-8)


def test_converted_model_trains_after_create_feature_extractor():
    original = _resnet18()
    converted = fused_resnet.convert(original)
    extractor = create_feature_extractor(converted, {"fc": "out"})
    reference = create_feature_extractor(original, {"fc": "out"})

    class Out(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)["out"]

    assert_same_training(Out(extractor), Out(reference), lambda: make_tensor(X, torch.float64), torch.float64, steps=2)


def test_converted_video_model_exports_and_jit_traces():
    torch.manual_seed(0)
    original = randomize_norms(torchvision.models.video.r3d_18(num_classes=10).to(DEVICE, torch.float64)).eval()
    converted = fused_resnet.convert(original)
    x = make_tensor((1, 3, 4, 16, 16), torch.float64)
    expected = original(x)
    exported = torch.export.export(converted, (x,))
    torch.testing.assert_close(exported.module()(x), expected, atol=1e-10, rtol=1e-8)
    traced = torch.jit.trace(converted, x)
    torch.testing.assert_close(traced(x), expected, atol=1e-10, rtol=1e-8)


def test_torchscript_refuses_converted_models_by_name():
    converted = fused_resnet.convert(torchvision.models.resnet18())
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile .*torch.jit.trace, torch.export"):
        torch.jit.script(converted)
    torch.jit.script(fused_resnet.unfuse(converted))  # the plain model scripts again


# ---------------------------------------------------------------------------------------------
# unfuse.


def test_unfuse_refuses_fused_modules_it_cannot_give_back():
    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = BatchNormReLU2d(3)  # this forward relies on the ReLU being in bn

        def forward(self, x):
            return self.bn(x)

    model = Direct()
    before = _state(model)
    with pytest.raises(ValueError, match=r"bn \(BatchNormReLU2d, not made by fused_resnet.convert\)"):
        fused_resnet.unfuse(model, inplace=True)
    _assert_state(model, before)


def test_unfuse_of_this_packages_models_and_folded_inference_models():
    torch.manual_seed(0)
    fused = randomize_norms(fused_resnet.models.resnet18(num_classes=10).to(DEVICE, torch.float64)).eval()
    x = make_tensor(X, torch.float64)
    expected = fused(x)
    for model in (fused, fused_resnet.optimize_for_inference(fused)):
        plain = fused_resnet.unfuse(model)
        assert not any(isinstance(m, (BatchNormReLU2d, BatchNormAddReLU2d, fused_resnet.nn.AddReLU)) for m in plain.modules())
        assert plain.state_dict().keys() == model.state_dict().keys()
        torch.testing.assert_close(plain(x), expected, atol=1e-10, rtol=1e-8)


def test_unfuse_after_sync_batchnorm_conversion():
    converted = fused_resnet.convert(torchvision.models.resnet18(), sync_batchnorm=True)
    plain = fused_resnet.unfuse(converted)
    assert {type(m) for m in plain.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)} == {nn.SyncBatchNorm}


# ---------------------------------------------------------------------------------------------
# Inference on torchvision's video ResNets: Conv3DSimple and the other Conv3d subclasses fold.
# r2plus1d_18's conv1.1 and conv2.1 (8 blocks x 2) follow a Conv2Plus1D, a Sequential ending in a
# Conv3d, not a convolution itself: they stay, fused.


@pytest.mark.parametrize("name, folded, fused", [("r3d_18", 20, 0), ("mc3_18", 20, 0), ("r2plus1d_18", 21, 16)])
def test_optimize_for_inference_folds_after_conv_subclasses(name, folded, fused):
    torch.manual_seed(0)
    original = randomize_norms(getattr(torchvision.models.video, name)(num_classes=10).to(DEVICE, torch.float64)).eval()
    optimized, report = fused_resnet.optimize_for_inference(original, return_report=True)
    assert (len(report.folded), len(report.fused), report.left) == (folded, fused, [])
    x = make_tensor((2, 3, 4, 16, 16), torch.float64)
    torch.testing.assert_close(optimized(x), original(x), atol=1e-10, rtol=1e-8)


def test_conv_subclass_with_its_own_forward_does_not_fold():
    class Scaled(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(Scaled(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).to(DEVICE, torch.float64).eval()
    randomize_norms(model)
    optimized, report = fused_resnet.optimize_for_inference(model, return_report=True)
    assert report.folded == [] and report.fused == [("1", "BatchNormReLU2d")]
    x = make_tensor((2, 3, 8, 8), torch.float64)
    torch.testing.assert_close(optimized(x), model(x), atol=1e-10, rtol=1e-8)
