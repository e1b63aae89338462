"""Frozen BatchNorm (fused_resnet/nn/frozen.py) against torchvision's FrozenBatchNorm2d and the
eager formula relu(x * scale + shift (+ residual)), in float64; freeze_batchnorm on single modules
and on a whole fused ResNet; state dicts, input errors, torch.fx and TorchScript.
"""

import pytest
import torch
from torch import nn

import fused_resnet
from helpers import (
    DEVICE,
    assert_close,
    eager_step,
    import_client,
    layouts_for,
    make_tensor,
    memory_format_of,
    act_mask,
)
from parity import randomize_norms
from fused_resnet.nn import (
    BatchNormAddReLU1d,
    BatchNormAddReLU2d,
    BatchNormAddReLU3d,
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
    FrozenBatchNorm,
    FrozenBatchNormAddReLU,
    FrozenBatchNormReLU,
    freeze_batchnorm,
)

torchvision = import_client("torchvision")

F64 = torch.float64
SHAPES = [
    (7, 5),  # 1D, (N, C)
    (4, 5, 9),  # 1D, (N, C, L)
    (3, 5, 7, 6),  # 2D
    (2, 5, 3, 5, 7),  # 3D
]
SHAPE_LAYOUTS = [(s, l) for s in SHAPES for l in layouts_for(s)]
SHAPE_IDS = [f"{s}-{l}" for s, l in SHAPE_LAYOUTS]


def _randomize_frozen(module):
    """Weights of both signs, bias, mean and variance away from their identity values."""
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.weight[::2].neg_()
        module.bias.normal_(0.0, 0.5)
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)
    return module


def _oracle(frozen):
    """x -> x * scale + shift in float64: torchvision's FrozenBatchNorm2d for 4D input, else the
    formula written out."""
    tv = torchvision.ops.FrozenBatchNorm2d(frozen.num_features, eps=frozen.eps).to(DEVICE, F64)
    tv.load_state_dict(frozen.state_dict(), strict=True)

    def forward(x):
        if x.dim() == 4:
            return tv(x)
        view = (1, -1) + (1,) * (x.dim() - 2)
        buffers = (frozen.weight, frozen.bias, frozen.running_mean, frozen.running_var)
        w, b, mean, var = (t.double().view(view) for t in buffers)
        scale = w / torch.sqrt(var + frozen.eps)
        return x * scale + (b - mean * scale)

    return forward


def _assert_frozen_state(module, before):
    assert list(module.parameters()) == []
    for name, buffer in module.named_buffers():
        assert not buffer.requires_grad and buffer.grad is None, name
        assert torch.equal(buffer, before[name]), f"{name} changed"


@pytest.mark.triton_interpreter(
    reason="the Triton interpreter runs the channels_last training-mode cases (a GPU run covers the rest)",
    only={"layout": ("channels_last",), "training": (True,)},
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add_relu"])
@pytest.mark.parametrize("shape,layout", SHAPE_LAYOUTS, ids=SHAPE_IDS)
def test_frozen_fused_matches_eager(backend, shape, layout, residual, training):
    cls = FrozenBatchNormAddReLU if residual else FrozenBatchNormReLU
    frozen = _randomize_frozen(cls(shape[1], eps=1e-3).to(DEVICE, F64)).train(training)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = make_tensor(shape, F64, layout, scale=1.5, offset=0.3).requires_grad_()
    r = make_tensor(shape, F64, layout).requires_grad_() if residual else None
    grad_out = make_tensor(shape, F64)

    out = frozen(x, r) if residual else frozen(x)
    assert out.shape == x.shape and out.dtype == F64
    assert (out == 0).any() and (out > 0).any(), "the ReLU should clip some values and pass others"
    if layout == "channels_last":
        assert memory_format_of(out) == memory_format_of(x), "output lost channels_last"
    out.backward(grad_out)

    ref_out, ref_gx, ref_gr = eager_step(_oracle(frozen), x, r, grad_out, act_mask(out.detach()))
    assert_close(out, ref_out, F64, "output")
    assert_close(x.grad, ref_gx, F64, "grad_input")
    if residual:
        assert_close(r.grad, ref_gr, F64, "grad_residual")
    _assert_frozen_state(frozen, before)


@pytest.mark.parametrize("shape,layout", SHAPE_LAYOUTS, ids=SHAPE_IDS)
def test_frozen_plain_matches_eager(shape, layout):
    frozen = _randomize_frozen(FrozenBatchNorm(shape[1], eps=1e-3).to(DEVICE, F64)).train()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = make_tensor(shape, F64, layout, scale=1.5, offset=0.3).requires_grad_()
    grad_out = make_tensor(shape, F64)
    out = frozen(x)
    assert memory_format_of(out) == memory_format_of(x)
    out.backward(grad_out)
    x64 = x.detach().clone().requires_grad_()
    ref = _oracle(frozen)(x64)
    ref.backward(grad_out)
    assert_close(out, ref, F64, "output")
    assert_close(x.grad, x64.grad, F64, "grad_input")
    _assert_frozen_state(frozen, before)


# ---------------------------------------------------------------------------------------------
# A whole fused ResNet, frozen, against its eager twin frozen with torchvision's module.


def _freeze_with_torchvision(model):
    """Every nn.BatchNorm2d of `model` replaced by torchvision's FrozenBatchNorm2d, by hand."""
    for name, bn in list(model.named_modules()):
        if type(bn) is nn.BatchNorm2d:
            tv = torchvision.ops.FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
            tv.to(bn.running_mean.device, bn.running_mean.dtype).load_state_dict(bn.state_dict())
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent).add_module(child, tv)
    return model


def _count(model, cls):
    return sum(type(m) is cls for m in model.modules())


@pytest.mark.triton_interpreter(reason="a whole ResNet under the Triton interpreter (a GPU run covers it)", skip=True)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_frozen_resnet18_matches_torchvision_frozen_twin(backend, training):
    fused = fused_resnet.models.resnet18(num_classes=10, fused=True).to(DEVICE, F64)
    randomize_norms(fused)
    eager = fused_resnet.models.resnet18(num_classes=10, fused=False).to(DEVICE, F64)
    eager.load_state_dict(fused.state_dict(), strict=True)
    fused.train(training)
    eager.train(training)

    frozen = freeze_batchnorm(fused)
    assert frozen is fused
    _freeze_with_torchvision(eager)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    # the stem and each block's bn1, each block's last BatchNorm, the downsample BatchNorms
    kinds = (FrozenBatchNormReLU, FrozenBatchNormAddReLU, FrozenBatchNorm)
    counts = [_count(frozen, c) for c in kinds]
    assert counts == [9, 8, 3]
    assert all(m.training == training for m in frozen.modules())

    state = frozen.state_dict()
    ref_state = eager.state_dict()
    assert list(state) == list(ref_state)
    assert not any(key.endswith("num_batches_tracked") for key in state)
    for key, value in ref_state.items():
        assert torch.equal(state[key], value), key
    before = {k: v.clone() for k, v in state.items()}

    x = make_tensor((2, 3, 32, 32), F64).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    grad_out = make_tensor((2, 10), F64)
    out = frozen(x)
    ref = eager(x_ref)
    out.backward(grad_out)
    ref.backward(grad_out)
    assert_close(out, ref, F64, "output")
    assert_close(x.grad, x_ref.grad, F64, "grad_input")
    assert_close(frozen.conv1.weight.grad, eager.conv1.weight.grad, F64, "conv1.weight.grad")
    for m in frozen.modules():
        if isinstance(m, (FrozenBatchNorm, FrozenBatchNormReLU, FrozenBatchNormAddReLU)):
            assert all(b.grad is None and not b.requires_grad for b in m.buffers())
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed in the forward"


@pytest.mark.parametrize("block", [fused_resnet.nn.Bottleneck, fused_resnet.nn.Bottleneck3d])
def test_frozen_blocks_apply_relu_and_add_once(block):
    """blocks.py counts the frozen fused modules as applying the ReLU (and the add): the block
    calls each once, and never its own relu."""
    spatial = (5, 6) if block is fused_resnet.nn.Bottleneck else (3, 4, 5)
    fused = block(16, 4).to(DEVICE, F64)
    randomize_norms(fused)
    eager = block(16, 4, fused=False).to(DEVICE, F64)
    eager.load_state_dict(fused.state_dict())
    freeze_batchnorm(fused)
    freeze_batchnorm(eager)  # FrozenBatchNorm + eager relu and add
    graph = torch.fx.symbolic_trace(fused).graph
    called = [n.target for n in graph.nodes if n.op == "call_module"]
    assert called == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3"]
    x = make_tensor((2, 16) + spatial, F64)
    assert_close(fused(x), eager(x), F64, "block output")


# ---------------------------------------------------------------------------------------------
# freeze_batchnorm on single modules.


def test_freeze_batchnorm_replaces_each_kind():
    class OtherBatchNorm(nn.BatchNorm2d):  # a subclass doing who knows what: left alone
        pass

    shared = BatchNormReLU2d(3)
    model = nn.ModuleDict(
        {
            "relu1d": BatchNormReLU1d(3),
            "relu2d": BatchNormReLU2d(3, eps=1e-3),
            "relu3d": BatchNormReLU3d(3),
            "add1d": BatchNormAddReLU1d(3),
            "add2d": BatchNormAddReLU2d(3),
            "add3d": BatchNormAddReLU3d(3).double(),
            "plain1d": nn.BatchNorm1d(3),
            "plain2d": nn.BatchNorm2d(3, eps=1e-2).eval(),
            "plain3d": nn.BatchNorm3d(3),
            "sync": nn.SyncBatchNorm(3),
            "sync_add": fused_resnet.nn.SyncBatchNormAddReLU(3),
            "no_affine": nn.BatchNorm2d(3, affine=False).double(),
            "other": OtherBatchNorm(3),
            "group": nn.GroupNorm(1, 3),
            "nested": nn.Sequential(nn.Identity(), shared),
            "shared": shared,
        }
    ).to(DEVICE)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            if m.weight is not None:
                _randomize_frozen(m)
    model["relu3d"].eval()
    originals = dict(model.items())
    frozen = freeze_batchnorm(model)
    assert frozen is model

    expected = {
        **dict.fromkeys(["relu1d", "relu2d", "relu3d", "shared"], FrozenBatchNormReLU),
        **dict.fromkeys(["add1d", "add2d", "add3d", "sync_add"], FrozenBatchNormAddReLU),
        **dict.fromkeys(["plain1d", "plain2d", "plain3d", "sync", "no_affine"], FrozenBatchNorm),
    }
    for name, cls in expected.items():
        new, old = model[name], originals[name]
        assert type(new) is cls, name
        assert new.training == old.training and new.eps == old.eps and new.num_features == 3, name
        for key in ("running_mean", "running_var", "weight", "bias"):
            value, source = getattr(new, key), getattr(old, key)
            if source is None:  # affine=False: the identity affine
                source = torch.full_like(old.running_mean, 1.0 if key == "weight" else 0.0)
            assert value.dtype == source.dtype and value.device == source.device, (name, key)
            assert torch.equal(value, source), (name, key)
            assert value.data_ptr() != source.data_ptr(), f"{name}.{key} aliases the original"
            assert not value.requires_grad
    assert model["relu3d"].training is False and model["plain2d"].training is False
    assert model["add3d"].weight.dtype == F64 and model["relu1d"].weight.dtype == torch.float32
    assert model["other"] is originals["other"] and model["group"] is originals["group"]
    assert model["nested"][1] is model["shared"], "a shared BatchNorm stays shared"
    kept = [*model["other"].parameters(), *model["group"].parameters()]
    assert [id(p) for p in model.parameters()] == [id(p) for p in kept], "unknown modules keep theirs"


def test_freeze_batchnorm_of_a_batchnorm_returns_its_twin():
    bn = _randomize_frozen(BatchNormAddReLU2d(4).to(DEVICE)).eval()
    frozen = freeze_batchnorm(bn)
    assert type(frozen) is FrozenBatchNormAddReLU and not frozen.training
    assert torch.equal(frozen.running_var, bn.running_var)
    assert type(freeze_batchnorm(nn.BatchNorm1d(4))) is FrozenBatchNorm
    group = nn.GroupNorm(2, 4)
    assert freeze_batchnorm(group) is group


def test_freeze_batchnorm_is_atomic():
    untracked = nn.BatchNorm2d(3, track_running_stats=False)
    model = nn.Sequential(BatchNormReLU2d(3), nn.Sequential(untracked))
    with pytest.raises(ValueError, match=r"1\.0 \(BatchNorm2d\).*track_running_stats=False"):
        freeze_batchnorm(model)
    assert type(model[0]) is BatchNormReLU2d and type(model[1][0]) is nn.BatchNorm2d


@pytest.mark.parametrize("argument", [3, None, torch.zeros(3)])
def test_freeze_batchnorm_refuses_a_non_module(argument):
    with pytest.raises(TypeError, match="freeze_batchnorm: expected an nn.Module"):
        freeze_batchnorm(argument)


# ---------------------------------------------------------------------------------------------
# State dicts, repr, errors.


@pytest.mark.parametrize("cls", [FrozenBatchNormReLU, FrozenBatchNormAddReLU, FrozenBatchNorm])
@pytest.mark.parametrize("source_cls", [nn.BatchNorm2d, BatchNormAddReLU2d])
def test_batchnorm_state_dict_loads_strictly(cls, source_cls):
    source = _randomize_frozen(source_cls(6))
    source.num_batches_tracked.fill_(7)
    state = source.state_dict()
    frozen = cls(6)
    frozen.load_state_dict(state, strict=True)
    assert "num_batches_tracked" in state, "loading must not change the caller's dict"
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(frozen, key), state[key]), key
    tv = torchvision.ops.FrozenBatchNorm2d(6)
    assert set(frozen.state_dict()) == set(tv.state_dict())
    tv.load_state_dict(frozen.state_dict(), strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        frozen.load_state_dict({**state, "surplus": torch.zeros(1)}, strict=True)


def test_repr_like_torchvision():
    for cls in (FrozenBatchNormReLU, FrozenBatchNormAddReLU, FrozenBatchNorm):
        assert repr(cls(7, eps=1e-3)) == f"{cls.__name__}(7, eps=0.001)"
    assert repr(torchvision.ops.FrozenBatchNorm2d(7, eps=1e-3)) == "FrozenBatchNorm2d(7, eps=0.001)"


def test_bad_input_raises_naming_what_is_wrong():
    """The module's own checks name the class; the op's (the op contract) name the op."""
    relu = FrozenBatchNormReLU(5).to(DEVICE)
    add = FrozenBatchNormAddReLU(5).to(DEVICE)
    x = make_tensor((2, 5, 3, 3), torch.float32)
    refused = (ValueError, RuntimeError)
    with pytest.raises(refused, match=r"FrozenBatchNormReLU: expected input with 5 channels"):
        relu(make_tensor((2, 4, 3, 3), torch.float32))
    with pytest.raises(refused, match=r"bn_act: .*at least 2 dimensions"):
        relu(make_tensor((5,), torch.float32))
    with pytest.raises(TypeError, match=r"bn_act: expected a floating-point input"):
        relu(torch.ones(2, 5, dtype=torch.int64, device=DEVICE))
    with pytest.raises(refused, match=r"bn_act: residual shape \(2, 5, 3, 1\) does"):
        add(x, make_tensor((2, 5, 3, 1), torch.float32))
    with pytest.raises(refused, match="FrozenBatchNormAddReLU: expected input with 5 channels"):
        add(make_tensor((2, 6, 3), torch.float32), make_tensor((2, 6, 3), torch.float32))


# ---------------------------------------------------------------------------------------------
# torch.fx and TorchScript.


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn = FrozenBatchNormReLU(5)
        self.conv2 = nn.Conv2d(5, 5, 1)
        self.bn2 = FrozenBatchNormAddReLU(5)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.bn2(self.conv2(y), y)


def test_symbolic_trace_keeps_one_node_per_frozen_module():
    model = _Small().to(DEVICE)
    _randomize_frozen(model.bn)
    _randomize_frozen(model.bn2)
    traced = torch.fx.symbolic_trace(model)
    nodes = list(traced.graph.nodes)
    assert [n.target for n in nodes if n.op == "call_module"] == ["conv", "bn", "conv2", "bn2"]
    assert not any(n.op in ("call_function", "call_method", "get_attr") for n in nodes)
    (bn2,) = [n for n in nodes if n.target == "bn2"]
    assert len(bn2.args) == 2
    x = make_tensor((2, 3, 6, 7), torch.float32)
    assert torch.equal(traced(x), model(x))


def test_symbolic_trace_through_plain_frozen_batchnorm():
    """FrozenBatchNorm is traced through (as torchvision's is), whatever the input's rank."""
    for conv, shape in ((nn.Conv1d, (2, 3, 9)), (nn.Conv3d, (2, 3, 3, 4, 5))):
        model = nn.Sequential(conv(3, 5, 1), _randomize_frozen(FrozenBatchNorm(5))).to(DEVICE, F64)
        traced = torch.fx.symbolic_trace(model)
        assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["0"]
        x = make_tensor(shape, F64)
        assert_close(traced(x), model(x), F64, "traced output")


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")
def test_script_refused_with_the_alternatives():
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace"):
        torch.jit.script(_Small())
    plain = _randomize_frozen(FrozenBatchNorm(5)).to(DEVICE, F64)
    scripted = torch.jit.script(plain)  # the eager frozen module stays scriptable
    x = make_tensor((2, 5, 3, 4), F64)
    assert_close(scripted(x), plain(x), F64, "scripted FrozenBatchNorm")
