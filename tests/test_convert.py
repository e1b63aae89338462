"""fused_resnet.convert: the seed models and every recognized pattern convert, and compute exactly
what the original computes (outputs, gradients, running statistics, SGD steps, train and eval);
what must not be fused is left, with the reason in the report."""

import copy
import importlib
import inspect
import operator
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from fused_resnet.nn import BatchNormAddReLU2d, BatchNormReLU2d
from helpers import ADD_SPELLINGS, DEVICE, make_tensor
from parity import assert_same_training, randomize_norms
import seed_models as seeds

# The module of convert's pass (the function fused_resnet.convert shadows the package attribute).
convert_module = importlib.import_module("fused_resnet.convert.fuse")


def _prepare(model):
    model = model.to(device=DEVICE, dtype=torch.float64)
    randomize_norms(model)
    return model


def _shortcut_norms(model):
    return sorted(
        n for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (".shortcut." in n or ".downsample." in n)
    )  # fmt: skip


# name: (model factory, input shape). The expected fused count is every BatchNorm but the
# shortcut ones (whose output goes straight to the add), counted from the model.
SEEDS = {
    "000_drn3d": (lambda: seeds.DRN(seeds.DRNBottleneck, [1, 1, 1, 1], width=4, pool=(1, 2, 2)), (2, 3, 8, 32, 32)),
    "001_cifar": (lambda: seeds.CifarResNet(seeds.CifarBasicBlock, [2, 2, 2], width=8), (4, 3, 16, 16)),
    "003_mlp": (lambda: seeds.ResidualNet(12, 24, 8, 3), (16, 12)),
    "004_resnet18": (lambda: seeds.TorchvisionStyleResNet18(num_classes=10, width=8), (2, 3, 48, 48)),
}  # fmt: skip


@pytest.mark.parametrize("seed", SEEDS)
def test_seed_model_converts_and_trains_identically(seed):
    factory, shape = SEEDS[seed]
    torch.manual_seed(0)
    original = _prepare(factory())
    converted, report = fused_resnet.convert(original, return_report=True)
    norms = [n for n, m in original.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert sorted(n for n, _ in report.left) == _shortcut_norms(original)
    assert len(report.fused) == len(norms) - len(_shortcut_norms(original)) > 0
    assert report.untraced == []
    assert all(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) for m in original.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)), "the original must be left as it was"
    converted.load_state_dict(original.state_dict(), strict=True)
    original.load_state_dict(converted.state_dict(), strict=True)
    for training in (True, False):
        assert_same_training(
            converted,
            original,
            lambda: make_tensor(shape, torch.float64),
            torch.float64,
            steps=2,
            training=training,
        )


def test_seed_001_relu_module_used_twice(backend):
    """001's block calls one nn.ReLU twice; both uses go, the module stays (it holds no state)."""
    torch.manual_seed(0)
    block = _prepare(seeds.CifarBasicBlock(4, 6, stride=2))
    converted, report = fused_resnet.convert(block, return_report=True)
    assert dict(report.fused) == {"bn1": "BatchNormReLU2d", "bn2": "BatchNormAddReLU2d"}
    assert [n for n, _ in report.left] == ["shortcut.1"]
    assert isinstance(converted.relu, nn.ReLU)
    assert_same_training(
        converted, block, lambda: make_tensor((3, 4, 7, 9), torch.float64, "channels_last"), torch.float64
    )


def test_seed_003_size_check_still_raises():
    block = seeds.ResidualBlock(12, 24)
    converted = fused_resnet.convert(block)
    assert type(converted.bn2).__name__ == "BatchNormAddReLU1d"
    with pytest.raises(ValueError, match="输入和输出的特征维度不匹配"):
        block(torch.randn(4, 12))
    with pytest.raises(ValueError, match="输入和输出的特征维度不匹配"):
        converted(torch.randn(4, 12))


# ---------------------------------------------------------------------------------------------
# Every ReLU form and add form, the BatchNorm on either side, nested in Sequential.

RELUS = {
    "module": lambda m, t: m.relu(t),
    "module_inplace": lambda m, t: m.relu_inplace(t),
    "F.relu": lambda m, t: F.relu(t),
    "F.relu_inplace": lambda m, t: F.relu(t, inplace=True),
    "F.relu_": lambda m, t: F.relu_(t),
    "torch.relu": lambda m, t: torch.relu(t),
    "Tensor.relu": lambda m, t: t.relu(),
    "Tensor.relu_": lambda m, t: t.relu_(),
}


ADDS = ADD_SPELLINGS


class PatternNet(nn.Module):
    def __init__(self, relu, add):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(5)
        self.bn_b = nn.BatchNorm2d(5)
        self.relu, self.relu_inplace = nn.ReLU(), nn.ReLU(inplace=True)
        self.tail = nn.Sequential(nn.Conv2d(5, 5, 1), nn.BatchNorm2d(5), nn.ReLU(inplace=True))
        self._relu, self._add = relu, add

    def forward(self, x):
        y = self.conv(x)
        h = RELUS[self._relu](self, self.bn_a(y))
        out = RELUS[self._relu](self, ADDS[self._add](self.bn_b(h), y))
        return self.tail(out)


FORMS = [(relu, "plus") for relu in RELUS] + [("F.relu_inplace", add) for add in ADDS if add != "plus"]


@pytest.mark.parametrize("relu, add", FORMS)
def test_relu_and_add_forms(relu, add):
    torch.manual_seed(0)
    net = _prepare(PatternNet(relu, add))
    converted, report = fused_resnet.convert(net, return_report=True)
    assert dict(report.fused) == {
        "bn_a": "BatchNormReLU2d", "bn_b": "BatchNormAddReLU2d", "tail.1": "BatchNormReLU2d"
    }  # fmt: skip
    assert report.left == []
    assert_same_training(converted, net, lambda: make_tensor((2, 3, 5, 6), torch.float64), torch.float64, steps=2)


# ---------------------------------------------------------------------------------------------
# What must not be fused, and the model keeps computing the same thing.


class Unfusable(nn.Module):
    """One BatchNorm per reason it must stay as it is."""

    def __init__(self):
        super().__init__()
        self.bn_two_uses = nn.BatchNorm2d(4)
        self.bn_sum_read_twice = nn.BatchNorm2d(4)  # fuses, with its add only
        self.bn_into_residual = nn.BatchNorm2d(4)
        self.bn_no_relu = nn.BatchNorm2d(4)
        self.bn_called_twice = nn.BatchNorm2d(4)
        self.bn_hooked = nn.BatchNorm2d(4)
        self.bn_hooked.register_forward_hook(lambda m, i, o: o * 2)

    def forward(self, x):
        a = self.bn_two_uses(x)
        a1 = F.relu(a)
        b = self.bn_sum_read_twice(x)
        s = b + a1
        c = F.relu(s) + s  # the sum has another use than the ReLU
        r = x * 1.5
        r.add_(self.bn_into_residual(x))  # writes into r
        d = F.relu(r)
        e = self.bn_no_relu(x)
        f = F.relu(self.bn_called_twice(x)) + F.relu(self.bn_called_twice(x))
        g = F.relu(self.bn_hooked(x))
        return (a + c + d + f + g) * e


def test_unfusable_batchnorms_are_left_with_reasons():
    torch.manual_seed(0)
    net = _prepare(Unfusable())
    converted, report = fused_resnet.convert(net, return_report=True)
    left = dict(report.left)
    # The sum read by the ReLU and again: the BatchNorm takes the add and no activation (its
    # output is the sum, for both readers).
    assert report.fused == [("bn_sum_read_twice", "BatchNormAddAct2d")]
    assert converted.bn_sum_read_twice.act == "identity"
    assert left["bn_two_uses"] == "cannot fuse: its output has 2 uses"
    assert left["bn_into_residual"].startswith("not supported: the add writes into the residual in place")
    assert left["bn_no_relu"] == "cannot fuse: its output goes to mul, not to an activation or an add"
    assert left["bn_called_twice"] == "not supported: it is called more than once"
    assert left["bn_hooked"].startswith("not supported: it has hooks")
    assert_same_training(converted, net, lambda: make_tensor((3, 4, 5, 5), torch.float64), torch.float64, steps=2)


class AugmentedInput(nn.Module):
    """`x += bn(y)` writes into the caller's tensor; torch.fx would record it as x + bn(y). As a
    function call, `operator.iadd(x, bn(y))`, no operator instruction tells the form."""

    def __init__(self, as_call=False):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.bn2 = nn.BatchNorm2d(3)
        self.as_call = as_call

    def forward(self, x, y):
        if self.as_call:
            x = operator.iadd(x, self.bn(y))
        else:
            x += self.bn(y)
        return F.relu(x) + F.relu(self.bn2(y))


@pytest.mark.parametrize("as_call", [False, True], ids=["operator", "function"])
def test_augmented_assignment_into_an_input_is_left(as_call):
    net = AugmentedInput(as_call)
    converted, report = fused_resnet.convert(net, return_report=True)
    expected = (
        "not supported: the forward of the model applies add to a tensor read elsewhere (the input x) "
        "where no `+` or `+=` operator tells the form, and torch.fx cannot tell `a += b` from `a = a + b`"
        if as_call
        else "not supported: the forward of the model writes `+=` into the input x, an update in place "
        "that the forward torch.fx regenerates would not make"
    )
    assert report.fused == [] and dict(report.left) == {"bn": expected, "bn2": expected}
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x_converted = x.clone()
    torch.testing.assert_close(converted(x_converted, y), net(x, y))
    torch.testing.assert_close(x_converted, x)  # the caller's tensor was updated in both


# Defined by exec, so that inspect.getsource cannot find the source: the form of each operator is
# read from the bytecode. `accumulate` is a helper the trace goes through.
_NO_SOURCE = """
def accumulate(total, value):
    total += value
    return total


class NewTensorResidual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.g = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = x + self.f(x)  # a new tensor: the caller's x stays as it was (RegNet)
        y = self.relu(x)
        return torch.relu(self.g(y) + y)


class HelperInPlace(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x, y):
        return accumulate(x, torch.relu(self.bn(y)))  # writes into the caller's x
"""
_no_source = {"nn": nn, "torch": torch, "__name__": "no_source"}
exec(compile(_NO_SOURCE, "<no source>", "exec"), _no_source)


def test_operator_forms_are_read_from_the_bytecode():
    """`x = x + f(x)`, with x an input read again afterwards, fuses: the bytecode says `+`, not
    `+=` (no source file is needed). `total += value` in a helper the forward calls, on the
    caller's tensor, is left with its reason, and the caller still sees the update."""
    with pytest.raises((OSError, TypeError)):  # TypeError: "is a built-in class"
        inspect.getsource(_no_source["NewTensorResidual"].forward)
    torch.manual_seed(0)
    net = _prepare(_no_source["NewTensorResidual"](4))
    converted, report = fused_resnet.convert(net, return_report=True)
    assert dict(report.fused) == {"f.1": "BatchNormAddReLU2d", "g.1": "BatchNormAddReLU2d"}
    x = make_tensor((2, 4, 5, 5), torch.float64)
    before = x.clone()
    torch.testing.assert_close(converted(x), net(before.clone()), atol=1e-12, rtol=1e-12)
    assert torch.equal(x, before), "the caller's tensor is unchanged"

    helper = _no_source["HelperInPlace"](3)
    converted, report = fused_resnet.convert(helper, return_report=True)
    assert report.left == [
        ("bn", "not supported: the forward of the model writes `+=` into the input x, an update in place "
         "that the forward torch.fx regenerates would not make")
    ]  # fmt: skip
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x_converted = x.clone()
    converted(x_converted, y), helper(x, y)
    torch.testing.assert_close(x_converted, x)


class Chain(nn.ModuleList):
    """A ModuleList with a forward of its own, as torchvision's IntermediateLayerGetter is a
    ModuleDict with one."""

    def forward(self, x):
        for layer in self:
            x = layer(x)
        return x


def test_module_list_with_a_forward_is_traced():
    torch.manual_seed(0)
    net = _prepare(nn.Sequential(Chain([nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()]), nn.Conv2d(4, 2, 1)))
    converted, report = fused_resnet.convert(net, return_report=True)
    assert report.fused == [("0.1", "BatchNormReLU2d")] and report.left == [] and report.untraced == []
    assert isinstance(converted[0], Chain)
    assert_same_training(converted, net, lambda: make_tensor((2, 3, 6, 6), torch.float64), torch.float64, steps=2)


class BroadcastResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.offset = nn.Parameter(torch.randn(3, 1, 1))

    def forward(self, x):
        return F.relu(self.bn(x) + torch.neg(self.offset))


def test_broadcast_residual_runs_the_original_add():
    torch.manual_seed(0)
    net = _prepare(BroadcastResidual())
    converted = fused_resnet.convert(net)
    assert type(converted.bn) is BatchNormAddReLU2d
    assert_same_training(converted, net, lambda: make_tensor((2, 3, 4, 5), torch.float64), torch.float64)


class ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return F.dropout(F.relu(self.bn(x)), 0.5, self.training)


def test_forward_that_reads_self_training_is_left():
    converted, report = fused_resnet.convert(ModeDependent(), return_report=True)
    assert report.fused == [] and dict(report.untraced)[""] == "its forward depends on self.training"


class DataDependentTop(nn.Module):
    """The top forward does not trace; its blocks do."""

    def __init__(self):
        super().__init__()
        self.block = seeds.TorchvisionStyleBasicBlock(4, 4)
        self.extra = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:
            return self.block(x)
        return self.extra(self.block(x))


def test_untraceable_model_still_converts_its_submodules():
    torch.manual_seed(0)
    net = _prepare(DataDependentTop())
    converted, report = fused_resnet.convert(net, return_report=True)
    assert [n for n, _ in report.untraced] == [""]
    assert sorted(n for n, _ in report.fused) == ["block.bn1", "block.bn2", "extra.0"]
    for sign in (1.0, -1.0):
        assert_same_training(
            converted, net, lambda: make_tensor((2, 4, 5, 5), torch.float64).abs() * sign, torch.float64, steps=1
        )


def test_known_blocks_convert_without_tracing(monkeypatch):
    """This package's eager blocks, and torchvision's blocks (here: a stand-in with torchvision's
    forward identity) when torch.fx fails, convert from their known dataflow."""

    class BasicBlock(seeds.TorchvisionStyleBasicBlock):
        def forward(self, x):
            return seeds.TorchvisionStyleBasicBlock.forward(self, x)

    BasicBlock.forward.__module__ = "torchvision.models.resnet"
    BasicBlock.forward.__qualname__ = "BasicBlock.forward"
    real_graph = convert_module._module_graph

    def no_trace_for_blocks(module):
        if isinstance(module, BasicBlock):
            raise convert_module.NotRewritable("simulated torch.fx failure")
        return real_graph(module)

    monkeypatch.setattr(convert_module, "_module_graph", no_trace_for_blocks)
    torch.manual_seed(0)
    ours = fused_resnet.nn.Bottleneck(8, 2, fused=False)
    theirs = BasicBlock(8, 8)
    net = _prepare(nn.Sequential(ours, theirs))
    converted, report = fused_resnet.convert(net, return_report=True)
    assert sorted(n for n, _ in report.fused) == ["0.bn1", "0.bn2", "0.bn3", "1.bn1", "1.bn2"]
    assert type(converted[1].bn2) is BatchNormAddReLU2d
    assert_same_training(converted, net, lambda: make_tensor((2, 8, 5, 5), torch.float64), torch.float64, steps=2)


# ---------------------------------------------------------------------------------------------
# What convert keeps, and its API.


def test_keeps_settings_mode_dtype_and_buffers():
    bn = nn.BatchNorm2d(4, eps=1e-3, momentum=None, affine=True).to(torch.float64).eval()
    bn.running_mean.normal_()
    net = nn.Sequential(nn.Conv2d(4, 4, 1).double(), bn, nn.ReLU())
    net.eval()
    converted = fused_resnet.convert(net)
    fused = converted[1]
    assert type(fused) is BatchNormReLU2d and type(net[1]) is nn.BatchNorm2d
    assert (fused.eps, fused.momentum, fused.training, fused.weight.dtype) == (1e-3, None, False, torch.float64)
    torch.testing.assert_close(fused.running_mean, bn.running_mean)
    assert fused.running_mean is not bn.running_mean  # a copy: the original is untouched
    untracked = nn.Sequential(nn.BatchNorm1d(3, affine=False, track_running_stats=False), nn.ReLU())
    fused1d = fused_resnet.convert(untracked)[0]
    assert fused1d.weight is None and fused1d.running_mean is None and type(fused1d).__name__ == "BatchNormReLU1d"


def test_inplace_keeps_the_parameter_objects():
    net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
    weight = net[1].weight
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    converted = fused_resnet.convert(net, inplace=True)
    assert converted is net and converted[1].weight is weight
    converted(torch.randn(2, 3, 4, 4)).sum().backward()
    optimizer.step()  # still updates the converted model's parameters


def test_converting_twice_changes_nothing():
    net = seeds.CifarResNet(seeds.CifarBasicBlock, [1, 1, 1], width=4)
    once = fused_resnet.convert(net)
    twice, report = fused_resnet.convert(once, return_report=True)
    assert report.fused == []
    x = torch.randn(2, 3, 8, 8)
    once.eval(), twice.eval()
    torch.testing.assert_close(twice(x), once(x))


def test_copies_work_and_pickling_says_what_to_do():
    net = fused_resnet.convert(seeds.CifarBasicBlock(3, 3))
    assert isinstance(net, seeds.CifarBasicBlock) and type(net).__name__ == "CifarBasicBlock"
    copied = copy.deepcopy(net)
    assert type(copied) is type(net) and copied.bn1 is not net.bn1
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(copied(x), net(x))
    torch.testing.assert_close(copy.copy(net)(x), net(x))
    with pytest.raises(TypeError, match="save its state_dict and call fused_resnet.convert again"):
        pickle.dumps(net)


def test_report_verbose_and_errors(capsys):
    model, report = fused_resnet.convert(seeds.CifarBasicBlock(3, 4), verbose=True, return_report=True)
    printed = capsys.readouterr().out
    assert "fused (2):" in printed and "bn2 -> BatchNormAddReLU2d" in printed and str(report) in printed
    assert str(fused_resnet.ConversionReport()) == "no BatchNorm found"
    with pytest.raises(ValueError, match="process_group is only used with sync_batchnorm=True"):
        fused_resnet.convert(model, process_group=object())
    with pytest.raises(TypeError, match="expected an nn.Module, got function"):
        fused_resnet.convert(lambda x: x)


def test_fuse_batchnorm_refuses_other_modules():
    with pytest.raises(TypeError, match="expected an nn.BatchNorm1d, nn.BatchNorm2d or nn.BatchNorm3d"):
        fused_resnet.nn.fuse_batchnorm_(nn.GroupNorm(2, 4))
    with pytest.raises(TypeError, match="BatchNormReLU2d"):
        fused_resnet.nn.fuse_batchnorm_(BatchNormReLU2d(4))


class NormsInContainers(nn.Module):
    """BatchNorms held in a ModuleList and a ModuleDict, called from the owner's forward."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 3, 3, padding=1) for _ in range(2)])
        self.norms = nn.ModuleList([nn.BatchNorm2d(3) for _ in range(2)])
        self.heads = nn.ModuleDict({"out": nn.BatchNorm2d(3)})

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu(norm(conv(x)))
        return F.relu(x + self.heads["out"](0.5 * x))


def test_norms_in_module_lists_and_dicts():
    torch.manual_seed(0)
    net = _prepare(NormsInContainers())
    converted, report = fused_resnet.convert(net, return_report=True)
    assert dict(report.fused) == {
        "norms.0": "BatchNormReLU2d", "norms.1": "BatchNormReLU2d", "heads.out": "BatchNormAddReLU2d"
    }  # fmt: skip
    assert_same_training(converted, net, lambda: make_tensor((2, 3, 5, 4), torch.float64), torch.float64)


def test_sync_batchnorm_conversion():
    """convert(sync_batchnorm=True): the fused BatchNorms become the fused sync modules, the one
    left unfused nn.SyncBatchNorm; same keys and, with no process group, the same computation."""
    torch.manual_seed(0)
    original = seeds.CifarBasicBlock(3, 4, stride=2).train()  # shortcut conv + BatchNorm: left unfused
    model, report = fused_resnet.convert(original, sync_batchnorm=True, return_report=True)
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    fused_names = {name for name, _ in report.fused}
    assert fused_names, "the block should fuse"
    for name, kind in kinds.items():
        expected = (
            {"BatchNormReLU2d": fused_resnet.nn.SyncBatchNormReLU, "BatchNormAddReLU2d": fused_resnet.nn.SyncBatchNormAddReLU}[
                dict(report.fused)[name]
            ]
            if name in fused_names
            else nn.SyncBatchNorm
        )
        assert kind is expected, name
    model.load_state_dict(original.state_dict(), strict=True)
    if any(kind is nn.SyncBatchNorm for kind in kinds.values()):
        model.eval(), original.eval()  # nn.SyncBatchNorm refuses CPU training; eval runs anywhere
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(model(x), original(x))
