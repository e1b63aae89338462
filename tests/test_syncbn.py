"""SyncBatchNormReLU / SyncBatchNormAddReLU over gloo processes on CPU, and their conversion.

Two spawns (2 and 3 processes) each run many sub-cases, for every backend available on CPU. In
each, every rank builds the same full batch, feeds its own slice (uneven sizes, empty slices) to
the sync module, and compares against one float64 eager nn.BatchNorm (+ add) + ReLU that sees the
whole batch: its slice of the output and of the input and residual gradients, the sum over ranks
of the parameter gradients, the running statistics and num_batches_tracked, over several steps.
The collectives the module calls are counted: one all_gather per forward (plus the channel-count
check on a module's first synchronized forward), one all_reduce per backward. A 2-process DDP
loop of a converted model matches single-process full-batch training.
"""

import collections
import contextlib
import copy
import os
import sys
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_resnet
from helpers import DEVICE, assert_close, check_state, eager_bn_class, eager_step, fused_class, randomize_affine, act_mask

CPU_BACKENDS = fused_resnet.available_backends("cpu")

# ---------------------------------------------------------------------------------------------
# Counting the collectives the module calls.

_COLLECTIVES = (
    "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object", "all_reduce",
    "all_to_all", "all_to_all_single", "barrier", "broadcast", "broadcast_object_list", "gather",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "send", "recv", "isend", "irecv",
)


class CollectiveCounter:
    """Wraps every torch.distributed collective; counts calls made inside `window()`."""

    def __init__(self):
        self.counts = collections.Counter()
        self.active = False
        for name in _COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self.active:
                self.counts[name] += 1
            return fn(*args, **kwargs)

        return counted

    @contextlib.contextmanager
    def window(self):
        self.counts = collections.Counter()
        self.active = True
        try:
            yield self.counts
        finally:
            self.active = False


# ---------------------------------------------------------------------------------------------
# Helpers run inside the workers.


def _fused_sync_class(residual):
    return fused_resnet.nn.SyncBatchNormAddReLU if residual else fused_resnet.nn.SyncBatchNormReLU


def _with_layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[t.dim()])
    if layout == "sliced":  # the same values as a non-contiguous view
        return torch.stack([t, torch.full_like(t, float("nan"))], -1).flatten(-2)[..., ::2]
    return t.contiguous()


def _gather_cat(t, world, group=None):
    """The ranks' tensors concatenated along dim 0 (test harness only)."""
    parts = [None] * world
    dist.all_gather_object(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts)


def run_against_full_batch(case, rank, world, counter, group=None):
    """The sync module on this rank's slice vs float64 eager on the whole batch."""
    name, rest, sizes, layout, dtype, residual, (affine, track, momentum), training = (
        case["name"], case["rest"], case["sizes"], case["layout"], case["dtype"], case["residual"],
        case["config"], case["training"],
    )
    ranks = case.get("ranks", list(range(world)))
    me = ranks.index(rank)
    channels, ndim = rest[0], len(rest) + 1
    torch.manual_seed(case["seed"])  # the same module and batches on every rank
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    kwargs = dict(affine=affine, track_running_stats=track, momentum=momentum)
    fused = _fused_sync_class(residual)(channels, process_group=group, **kwargs).to(param_dtype)
    randomize_affine(fused)
    if track:
        fused.running_mean.normal_()
        fused.running_var.uniform_(0.5, 2.0)
    eager = eager_bn_class(ndim)(channels, **kwargs).double()
    eager.load_state_dict(fused.state_dict())
    fused.train(training)
    eager.train(training)
    lo, hi = sum(sizes[:me]), sum(sizes[: me + 1])
    for step in range(case.get("steps", 2)):
        what = f"{name} rank {rank} step {step}"
        full = [torch.randn((sum(sizes),) + rest, dtype=torch.float64) * 1.5 + 0.3 for _ in range(3)]
        full_x, full_r, full_g = (t.to(dtype) for t in full)
        x = _with_layout(full_x[lo:hi], layout).requires_grad_()
        r = _with_layout(full_r[lo:hi], layout).requires_grad_() if residual else None

        with counter.window() as forward_calls:
            out = fused(x, r) if residual else fused(x)
        with counter.window() as backward_calls:
            out.backward(full_g[lo:hi])
        if training:
            assert dict(forward_calls) == {"all_gather": 2 if step == 0 else 1}, f"{what}: {forward_calls}"
            assert dict(backward_calls) == {"all_reduce": 1}, f"{what}: {backward_calls}"
        else:
            assert not forward_calls and not backward_calls, f"{what}: eval communicates"
        assert out.shape == x.shape and out.dtype == dtype

        if training:  # the batch is the concatenation of every rank's slice
            mask = act_mask(_gather_cat(out, len(ranks), group))
            ref_out, ref_gx, ref_gr = eager_step(
                eager, full_x.requires_grad_(), full_r if residual else None, full_g, mask
            )
            ref_out, ref_gx = ref_out[lo:hi], ref_gx[lo:hi]
            ref_gr = ref_gr[lo:hi] if residual else None
        else:
            ref_out, ref_gx, ref_gr = eager_step(
                eager, full_x[lo:hi].requires_grad_(), full_r[lo:hi] if residual else None, full_g[lo:hi],
                act_mask(out.detach()),
            )
        assert_close(out, ref_out, dtype, f"{what}: output")
        assert_close(x.grad, ref_gx, dtype, f"{what}: grad_input")
        if residual:
            assert_close(r.grad, ref_gr, dtype, f"{what}: grad_residual")
        if affine:
            grads = [fused.weight.grad, fused.bias.grad]
            assert all(g.dtype == param_dtype for g in grads)
            if training:  # per rank, as nn.SyncBatchNorm: their sum is the full batch's gradient
                grads = [_gather_cat(g[None], len(ranks), group).sum(0) for g in grads]
            assert_close(grads[0], eager.weight.grad, dtype, f"{what}: grad_weight")
            assert_close(grads[1], eager.bias.grad, dtype, f"{what}: grad_bias")
            fused.weight.grad = fused.bias.grad = eager.weight.grad = eager.bias.grad = None
        check_state(fused, eager, dtype, what)


def check_matches_non_sync_module(case, rank, counter, group):
    """A process group of one rank: exactly the non-sync fused module, no communication."""
    rest, residual = case["rest"], case["residual"]
    torch.manual_seed(case["seed"] + rank)
    sync = _fused_sync_class(residual)(rest[0], process_group=group, momentum=None)
    plain = fused_class(len(rest) + 1, residual)(rest[0], momentum=None)
    randomize_affine(sync)
    plain.load_state_dict(sync.state_dict())
    for step in range(2):
        x = torch.randn((3,) + rest).requires_grad_()
        r = torch.randn((3,) + rest).requires_grad_() if residual else None
        args = (x, r) if residual else (x,)
        with counter.window() as calls:
            out = sync(*args)
            out.backward(torch.ones_like(out))
        assert not calls, calls
        sync_grads = [x.grad] + ([r.grad] if residual else []) + [sync.weight.grad, sync.bias.grad]
        x.grad = None
        if residual:
            r.grad = None
        ref = plain(*args)
        ref.backward(torch.ones_like(ref))
        ref_grads = [x.grad] + ([r.grad] if residual else []) + [plain.weight.grad, plain.bias.grad]
        assert torch.equal(out, ref)
        assert all(torch.equal(a, b) for a, b in zip(sync_grads, ref_grads))
        assert all(torch.equal(a, b) for a, b in zip(sync.state_dict().values(), plain.state_dict().values()))
        sync.zero_grad()
        plain.zero_grad()


def check_errors(rank, world, counter):
    # ranks disagree on the channel count: a clear error on every rank, no state change
    module = fused_resnet.nn.SyncBatchNormReLU(4 + 2 * rank)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=r"processes disagree on the number of channels \(num_features by rank"):
        module(torch.randn(3, 4 + 2 * rank, 5))
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())

    # one value per channel over all processes
    module = fused_resnet.nn.SyncBatchNormReLU(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training, got 1 value per channel over"):
        module(torch.randn(1 if rank == 0 else 0, 3))
    assert int(module.num_batches_tracked) == 0 and torch.equal(module.running_mean, torch.zeros(3))

    # the non-sync modules' input checks, before any communication
    module = fused_resnet.nn.SyncBatchNormAddReLU(4)
    with counter.window() as calls:
        with pytest.raises(ValueError, match=r"residual shape \(2, 4, 3, 1\) does not match input shape \(2, 4, 3, 3\)"):
            module(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 1))
        with pytest.raises(ValueError, match="expected input with 4 channels"):
            module(torch.randn(2, 5, 3), torch.randn(2, 5, 3))
        with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
            module(torch.randn(4), torch.randn(4))
    assert not calls and int(module.num_batches_tracked) == 0


class SmallNet(nn.Module):
    """conv -> BN+ReLU -> conv -> BN+add+ReLU -> pool -> linear; fused or eager (same state_dict keys)."""

    def __init__(self, fused):
        super().__init__()
        self.fused = fused
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = fused_resnet.nn.BatchNormReLU2d(6) if fused else nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = fused_resnet.nn.BatchNormAddReLU2d(6) if fused else nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        if self.fused:
            y = self.bn1(self.conv1(x))
            y = self.bn2(self.conv2(y), y)
        else:
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.head(y.mean((2, 3)))


def check_ddp_training(rank, world, steps=3, batch=8):
    torch.manual_seed(0)
    reference = SmallNet(fused=False).double()
    model = SmallNet(fused=True).double()
    model.load_state_dict(reference.state_dict())
    model = fused_resnet.nn.convert_sync_batchnorm(model)
    assert isinstance(model.bn1, fused_resnet.nn.SyncBatchNormReLU)
    assert isinstance(model.bn2, fused_resnet.nn.SyncBatchNormAddReLU)
    with pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules"):
        nn.parallel.DistributedDataParallel(model)  # torch's DDP refuses any SyncBatchNorm on CPU
    with pytest.raises(ValueError, match="SyncBatchNorm layers only work with GPU modules"):
        fused_resnet.nn.DistributedDataParallel(nn.Sequential(model, nn.SyncBatchNorm(4)))
    ddp = fused_resnet.nn.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    per_rank = batch // world
    for _ in range(steps):
        x = torch.randn(batch, 3, 5, 7, dtype=torch.float64)
        target = torch.randn(batch, 4, dtype=torch.float64)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        nn.functional.mse_loss(ddp(x[mine]), target[mine]).backward()
        optimizer.step()
        optimizer.zero_grad()
        nn.functional.mse_loss(reference(x), target).backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
    for (key, value), ref in zip(model.state_dict().items(), reference.state_dict().values()):
        if value.is_floating_point():
            assert_close(value, ref, torch.float64, f"rank {rank}: {key} after DDP training")
        else:
            assert torch.equal(value, ref), key


# ---------------------------------------------------------------------------------------------
# The spawned workers.


def _worker(rank, world, init_file, cases, extra_checks):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        counter = CollectiveCounter()
        singletons = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
        pair = dist.new_group([0, world - 1]) if world > 2 else None
        for case in cases:
            with fused_resnet.use_backend(case["backend"]):
                if case.get("ranks") is not None:
                    if rank in case["ranks"]:
                        run_against_full_batch(case, rank, world, counter, group=pair)
                elif case.get("singleton"):
                    check_matches_non_sync_module(case, rank, counter, singletons[rank])
                else:
                    run_against_full_batch(case, rank, world, counter)
        if "errors" in extra_checks:
            check_errors(rank, world, counter)
        if "ddp" in extra_checks:
            check_ddp_training(rank, world)
    finally:
        dist.destroy_process_group()
    # Every check has passed: leave without interpreter teardown. A gloo process that ran DDP was
    # seen to abort at exit now and then ("terminate called without an active exception", in 2 of
    # ~11 runs of examples/ddp_train.py; cause not found), which would fail the spawn afterwards.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(world, cases, extra_checks=()):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), cases, extra_checks), nprocs=world)


CONFIGS = {
    "default": (True, True, 0.1),
    "cumulative": (True, True, None),
    "no_affine": (False, True, 0.1),
    "no_track": (True, False, 0.1),
}
# (per-sample shape (C, *spatial), layout, dtype)
INPUTS = [
    ((5,), "contiguous", torch.float64),  # (N, C)
    ((3, 7), "sliced", torch.float64),  # (N, C, L)
    ((4, 3, 5), "contiguous", torch.float64),
    ((19, 3, 3), "channels_last", torch.float64),
    ((3, 2, 3, 4), "channels_last", torch.float64),  # (N, C, D, H, W)
    ((6, 5, 4), "channels_last", torch.float32),
    ((6, 4, 5), "contiguous", torch.bfloat16),
]


def _cases(world, sizes_list):
    cases, seed = [], 0
    for backend in CPU_BACKENDS:
        for rest, layout, dtype in INPUTS:
            for residual in (False, True):
                for config_name, config in CONFIGS.items():
                    if config_name != "default" and (dtype != torch.float64 or rest != (4, 3, 5)):
                        continue  # every config on one input; every input on the default config
                    for sizes in sizes_list:
                        seed += 1
                        cases.append(dict(
                            name=f"{backend}-{rest}-{layout}-{str(dtype)[6:]}-{'add' if residual else 'relu'}-"
                                 f"{config_name}-sizes{sizes}",
                            backend=backend, rest=rest, sizes=sizes, layout=layout, dtype=dtype,
                            residual=residual, config=config, training=True, seed=seed,
                        ))
        for residual in (False, True):
            seed += 1
            base = dict(backend=backend, rest=(4, 3, 5), layout="contiguous", dtype=torch.float64,
                        residual=residual, config=CONFIGS["default"], seed=seed)
            cases.append(dict(base, name=f"{backend}-eval-{residual}", sizes=sizes_list[0], training=False))
            if world == 2:
                cases.append(dict(base, name=f"{backend}-singleton-group-{residual}", singleton=True))
            else:
                cases.append(dict(base, name=f"{backend}-pair-group-{residual}", sizes=[3, 4],
                                  ranks=[0, world - 1], training=True))
    return cases


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes():
    """Uneven and empty slices, every layout and config, errors, DDP training: 2 gloo processes."""
    _spawn(2, _cases(2, [[3, 5], [0, 4]]), extra_checks=("errors", "ddp"))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_three_processes():
    """Three uneven slices, one of them empty; a process group of two of the three ranks."""
    cases = [c for c in _cases(3, [[2, 0, 5]]) if c["config"] == CONFIGS["default"] or c.get("ranks")]
    _spawn(3, cases, extra_checks=("errors",))


# ---------------------------------------------------------------------------------------------
# Without a process group, and conversion (in this process, on the device and backends under test).


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5, 6), (2, 3, 2, 3, 4)])
def test_without_process_group_is_the_non_sync_module(backend, shape, training):
    assert not dist.is_initialized()
    residual = len(shape) == 4
    sync = _fused_sync_class(residual)(shape[1], momentum=None).to(DEVICE)
    plain = fused_class(len(shape), residual)(shape[1], momentum=None).to(DEVICE)
    randomize_affine(sync)
    plain.load_state_dict(sync.state_dict())
    sync.train(training)
    plain.train(training)
    for _ in range(2):
        inputs = [torch.randn(shape, device=DEVICE).requires_grad_() for _ in range(2 if residual else 1)]
        out, ref = sync(*inputs), plain(*inputs)
        assert torch.equal(out, ref)
        grads = torch.autograd.grad(out.sum(), inputs + [sync.weight, sync.bias])
        ref_grads = torch.autograd.grad(ref.sum(), inputs + [plain.weight, plain.bias])
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
        for a, b in zip(sync.state_dict().values(), plain.state_dict().values()):
            assert torch.equal(a, b)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn_relu = fused_resnet.nn.BatchNormReLU2d(4, momentum=None)
        self.bn_add = fused_resnet.nn.BatchNormAddReLU1d(3, eps=1e-3, affine=False)
        self.plain = nn.BatchNorm3d(2, track_running_stats=False)
        self.inner = nn.Sequential(nn.Conv2d(4, 4, 1), fused_resnet.nn.BatchNormAddReLU3d(5))


def test_convert_sync_batchnorm_keeps_everything():
    model = _Block()
    model.inner[1].eval()
    model.bn_relu.running_mean.normal_()
    model.bn_relu.num_batches_tracked.fill_(7)
    names = [n for n, _ in model.named_modules()]
    state = copy.deepcopy(model.state_dict())
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    group = object()  # stored, not used without a synchronized forward

    converted = fused_resnet.nn.convert_sync_batchnorm(model, process_group=group)
    expected = {
        "bn_relu": fused_resnet.nn.SyncBatchNormReLU,
        "bn_add": fused_resnet.nn.SyncBatchNormAddReLU,
        "plain": nn.SyncBatchNorm,
        "inner.1": fused_resnet.nn.SyncBatchNormAddReLU,
    }
    modules = dict(converted.named_modules())
    assert [n for n, _ in converted.named_modules()] == names
    for name, cls in expected.items():
        assert type(modules[name]) is cls, name
        assert modules[name].process_group is group
    assert modules["bn_relu"].momentum is None and modules["bn_add"].eps == 1e-3
    assert not modules["bn_add"].affine and modules["plain"].running_mean is None
    assert not modules["inner.1"].training and modules["bn_relu"].training
    # the same Parameter and buffer objects: an optimizer built before still holds them
    assert all(p is params[n] for n, p in converted.named_parameters())
    assert all(b is buffers[n] for n, b in converted.named_buffers())
    assert list(converted.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in converted.state_dict().items())

    # a BatchNorm at the top is returned converted; the classmethod is the same function
    top = fused_resnet.nn.BatchNormReLU3d(3)
    assert type(fused_resnet.nn.convert_sync_batchnorm(top)) is fused_resnet.nn.SyncBatchNormReLU
    via_classmethod = fused_resnet.nn.SyncBatchNormReLU.convert_sync_batchnorm(_Block())
    assert type(via_classmethod.bn_add) is fused_resnet.nn.SyncBatchNormAddReLU


def test_converted_model_computes_the_same_without_process_group(backend):
    model = SmallNet(fused=True).to(DEVICE, torch.float64)
    converted = fused_resnet.nn.convert_sync_batchnorm(copy.deepcopy(model))
    x = torch.randn(4, 3, 5, 7, dtype=torch.float64, device=DEVICE)
    assert torch.equal(model(x), converted(x))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), converted.state_dict().values()))
