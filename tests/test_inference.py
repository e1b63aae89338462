"""fused_resnet.optimize_for_inference: BatchNorm folded into the convolutions, the rest fused; the
output matches the eval-mode model within the fp32 tolerance of the table; training-mode models
are refused; the input model is left as it is."""

import copy

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet import models
from fused_resnet.nn import AddReLU, BatchNormAddReLU1d, BatchNormReLU1d
from helpers import DEVICE, assert_close, make_tensor, no_tf32
import seed_models as seeds


@pytest.fixture(autouse=True)
def _float32_convolutions():
    """Folded and unfolded convolutions compared at the float32 tolerance: not in TF32 (CUDA's
    default for float32 convolutions, ~1e-3 relative error)."""
    with no_tf32():
        yield


# name: (factory, input shape, how many BatchNorms fold; None: all of them)
MODELS = {
    "000_drn3d": (lambda: seeds.DRN(seeds.DRNBottleneck, [1, 1, 1, 1], width=4, pool=(1, 2, 2)), (2, 3, 8, 32, 32), None),
    "001_cifar": (lambda: seeds.CifarResNet(seeds.CifarBasicBlock, [2, 2, 2], width=8), (4, 3, 16, 16), None),
    "001_cifar_converted": (
        lambda: fused_resnet.convert(seeds.CifarResNet(seeds.CifarBasicBlock, [1, 1, 1], width=8)), (4, 3, 16, 16), None
    ),
    "003_mlp": (lambda: seeds.ResidualNet(12, 24, 8, 3), (16, 12), 0),
    "004_resnet18": (lambda: seeds.TorchvisionStyleResNet18(num_classes=10, width=8), (2, 3, 48, 48), None),
    "resnet18_fused": (lambda: models.resnet18(num_classes=10), (2, 3, 48, 48), None),
    "resnet50_eager": (lambda: models.resnet50(num_classes=10, fused=False), (2, 3, 48, 48), None),
}  # fmt: skip


def _eval_model(factory):
    torch.manual_seed(0)
    model = factory().to(DEVICE).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.5)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _norms(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name", MODELS)
def test_matches_eval_model(name):
    factory, shape, folds = MODELS[name]
    model = _eval_model(factory)
    before = copy.deepcopy(model.state_dict())
    types_before = [type(m) for m in model.modules()]
    optimized, report = fused_resnet.optimize_for_inference(model, return_report=True)
    norms = _norms(model)
    assert len(report.folded) == (len(norms) if folds is None else folds)
    assert len(report.folded) + len(report.fused) + len(report.left) >= len(norms)
    assert _norms(optimized) == [n for n, _ in report.fused + report.left]  # the folded are gone
    x = make_tensor(shape, torch.float32)
    with torch.no_grad():
        assert_close(optimized(x), model(x), torch.float32, "output")
    assert [type(m) for m in model.modules()] == types_before, "the input model was changed"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"the input model's {key} was changed"


def test_what_folded_norms_become():
    """The fused ResNet and its eager twin alike (convert fuses the eager one first): bn1 leaves
    its ReLU, bn2 the one-pass add + ReLU, the unfused downsample BatchNorm nothing."""
    for fused in (True, False):
        optimized = fused_resnet.optimize_for_inference(_eval_model(lambda: models.resnet18(num_classes=3, fused=fused)))
        block = optimized.layer2[0]
        assert isinstance(block.bn1, nn.ReLU) and isinstance(block.bn2, AddReLU)
        assert isinstance(block.downsample[1], nn.Identity)
        assert block.conv1.bias is not None  # the folded shift


def test_mlp_norms_are_fused_instead(backend):
    model = _eval_model(lambda: seeds.ResidualNet(12, 24, 8, 2))
    optimized, report = fused_resnet.optimize_for_inference(model, return_report=True)
    assert report.folded == [] and len(report.fused) == 4
    assert type(optimized.blocks[0].bn1) is BatchNormReLU1d
    assert type(optimized.blocks[0].bn2) is BatchNormAddReLU1d
    x = make_tensor((9, 12), torch.float32)
    with torch.no_grad():
        assert_close(optimized(x), model(x), torch.float32, "output")


class SharedConv(nn.Module):
    """The convolution's output is also used after the BatchNorm: folding would change it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y)) * y


def test_conv_with_another_use_is_not_folded():
    model = _eval_model(SharedConv)
    optimized, report = fused_resnet.optimize_for_inference(model, return_report=True)
    assert report.folded == [] and [n for n, _ in report.fused] == ["bn"]
    x = make_tensor((2, 3, 5, 5), torch.float32)
    with torch.no_grad():
        assert_close(optimized(x), model(x), torch.float32, "output")


def test_training_model_is_refused_and_left_as_it_is():
    model = _eval_model(lambda: seeds.CifarBasicBlock(3, 4))
    model.bn2.train()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=r"must be in eval mode \(call model.eval\(\) first\).*'bn2'"):
        fused_resnet.optimize_for_inference(model)
    assert type(model.bn2) is nn.BatchNorm2d and "forward" not in model.__dict__
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="expected an nn.Module"):
        fused_resnet.optimize_for_inference("resnet18")


def test_inplace():
    model = _eval_model(lambda: seeds.CifarBasicBlock(3, 4))
    assert fused_resnet.optimize_for_inference(model, inplace=True) is model
    assert isinstance(model.bn1, nn.ReLU)  # fused with its ReLU, then folded


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 4, 7), (6, 9), (2, 3, 2, 3, 5)])
def test_add_relu_is_exact(backend, shape, dtype):
    """Identity statistics make the fused kernel compute relu(x + r) with no rounding of its own."""
    x = make_tensor(shape, dtype).requires_grad_()
    r = make_tensor(shape, dtype).requires_grad_()
    out = AddReLU()(x, r)
    expected = torch.relu(x.detach() + r.detach())
    assert out.dtype == dtype and torch.equal(out, expected)
    out.backward(torch.ones_like(out))
    mask = (expected > 0).to(dtype)
    assert torch.equal(x.grad, mask) and torch.equal(r.grad, mask)
