"""The Triton launch path (fused_resnet/triton/launch.py, tiles.py, partition.py, launchers.py): the device guard,
float arguments exact in float64, int64 index arithmetic at the size limit, tiles by rule, the
tuner and the launches under two threads, and the specialization count of a GPU run.

The kernels run on the Triton interpreter here (CPU tensors); what only a GPU shows (another
current device, float32 arguments of compiled Triton) is checked at the launch: the guard taken,
the arguments passed.
"""

import contextlib
import struct
import threading

import pytest
import torch
import triton
import triton.language as tl

import fused_resnet
from fused_resnet.contract import op_set_of
from helpers import BACKENDS, DEVICE, assert_close, make_tensor

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend for these tensors")
if "triton" in BACKENDS:
    from fused_resnet.triton import kernels, launch, launchers, partition, tiles

    triton_ops = op_set_of(torch.ops.fused_resnet_triton)


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch as (kernel name, {argument: value}, meta), launched as usual."""
    recorded = []
    call = launch.Kernel.__call__

    def recording(kernel, grid, *args, **meta):
        recorded.append((kernel.name, dict(zip(kernel.arg_names, args)), meta))
        return call(kernel, grid, *args, **meta)

    monkeypatch.setattr(launch.Kernel, "__call__", recording)
    return recorded


def _module_step(module, x, r):
    with fused_resnet.use_backend("triton"):
        out = module(x, r)
        out.sum().backward()
    return out


def _ops_calls(dtype=torch.float32):
    """One call of each of the seven Triton ops on small inputs."""
    x = make_tensor((3, 4, 5), dtype)
    r = make_tensor(x.shape, dtype)
    w, b = torch.rand(4, device=DEVICE) + 0.5, torch.randn(4, device=DEVICE)
    rm, rv = torch.randn(4, device=DEVICE), torch.rand(4, device=DEVICE) + 0.5
    out, mean, invstd, _var, mask = triton_ops.bn_act_fwd_train(x, r, w, b, 1e-5)
    g = make_tensor(x.shape, dtype)
    return [
        lambda: triton_ops.bn_act(x, r, w, b, rm, rv, True, 0.1, 1e-5),
        lambda: triton_ops.bn_act_fwd_train(x, r, w, b, 1e-5),
        lambda: triton_ops.bn_act_fwd_eval(x, r, rm, rv, w, b, 1e-5),
        lambda: triton_ops.bn_act_bwd(g, out, mask, x, w, mean, invstd, True, True),
        lambda: triton_ops.bn_stats(x),
        lambda: triton_ops.bn_act_bwd_reduce(g, out, x, mean, invstd),
        lambda: triton_ops.bn_act_bwd_apply(g, out, x, w, mean, invstd, mean * 0.1, invstd * 0.1, True),
    ]


# ---------------------------------------------------------------------------------------------
# Device guard.


def test_device_guard_makes_the_tensors_device_current(monkeypatch):
    """cuda:1 with cuda:0 current enters torch.cuda.device(1); the current device or a CPU tensor
    enters nothing (the call costs no device switch)."""
    entered = []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    with launch.device_guard(torch.device("cuda", 1)):
        assert entered == [1]
    with launch.device_guard(torch.device("cuda", 0)), launch.device_guard(torch.device("cpu")):
        pass
    assert entered == [1]


def test_every_op_launches_under_its_input_device_guard(monkeypatch):
    guarded = []
    inside = []
    call = launch.Kernel.__call__

    @contextlib.contextmanager
    def guard(device):
        guarded.append(device)
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    def launch_checked(kernel, grid, *args, **meta):
        assert inside, f"{kernel.name} launched outside the device guard"
        return call(kernel, grid, *args, **meta)

    monkeypatch.setattr(launchers, "device_guard", guard)
    monkeypatch.setattr(launch.Kernel, "__call__", launch_checked)
    inputs_device = make_tensor((1,), torch.float32).device  # as _ops_calls makes them: cuda:0, not cuda
    for op_call in _ops_calls():
        before = len(guarded)
        op_call()
        assert guarded[before:] == [inputs_device], guarded[before:]


# ---------------------------------------------------------------------------------------------
# Float arguments: compiled Triton passes a Python float as float32.


@pytest.mark.parametrize("eps,momentum", [(1e-5, 0.1), (1e-3, 1 / 3)])
def test_eps_and_momentum_reach_the_kernels_exactly(launches, eps, momentum):
    """eps and momentum arrive as their float64 bits (an int64 argument), which a float32
    argument would round: eps = 1e-5 as float32 is 2.5e-13 off."""
    x = make_tensor((4, 3, 5), torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64, device=DEVICE), torch.ones(3, dtype=torch.float64, device=DEVICE)
    triton_ops.bn_act(x, None, None, None, rm, rv, True, momentum, eps)
    triton_ops.bn_act_fwd_eval(x, None, rm, rv, None, None, eps)
    passed = {}
    for name, args, _meta in launches:
        for value, arg in ((eps, "eps_bits"), (momentum, "momentum_bits")):
            if arg in args:
                passed.setdefault(arg, []).append(struct.unpack("<d", struct.pack("<q", args[arg]))[0])
    assert passed == {"eps_bits": [eps] * 3, "momentum_bits": [momentum]}, passed  # stats, two applies


def test_float64_invstd_with_variance_below_eps(backend):
    """A channel whose variance is far below eps: invstd is set by eps, to the float64 tolerance."""
    x = make_tensor((6, 3, 7), torch.float64, scale=1e-4)
    rm, rv = torch.zeros(3, dtype=torch.float64, device=DEVICE), torch.ones(3, dtype=torch.float64, device=DEVICE)
    ref_rm, ref_rv = rm.clone(), rv.clone()
    out = fused_resnet.functional.batch_norm_relu(x, rm, rv, training=True, eps=1e-5)
    ref = torch.relu(torch.nn.functional.batch_norm(x, ref_rm, ref_rv, training=True, eps=1e-5))
    assert_close(out, ref, torch.float64, "output")
    assert_close(rv, ref_rv, torch.float64, "running_var")


# ---------------------------------------------------------------------------------------------
# Index arithmetic at the size limit: n_outer and n_inner up to 2**31 - 1.


@triton.jit
def _index_probe_kernel(out_ptr, pid, split, splits_b, chunk_a, chunk_b, n_outer, n_channels, n_inner,
                        BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr):
    a, c, b, c_mask, mask = kernels._tile_position(pid, n_outer, n_channels, n_inner, BLOCK_A, BLOCK_C, BLOCK_B)
    a_begin, a_end, b_begin, b_end = kernels._split_bounds(split, splits_b, chunk_a, chunk_b, n_outer, n_inner)
    tl.store(out_ptr + 0, tl.max(a, axis=0))
    tl.store(out_ptr + 1, tl.max(b, axis=0))
    tl.store(out_ptr + 2, tl.sum(tl.sum(tl.sum(mask.to(tl.int64), axis=2), axis=1), axis=0))
    tl.store(out_ptr + 3, a_begin)
    tl.store(out_ptr + 4, a_end)
    tl.store(out_ptr + 5, b_begin)
    tl.store(out_ptr + 6, b_end)


def test_index_arithmetic_holds_at_the_size_limit():
    """The last tile of an n_inner = 2**31 - 1 row and the second split of an n_outer = 2**31 - 1
    reduction: int32 tile starts, cdiv and chunk ends would wrap there."""
    if not launch.INTERPRETED:
        pytest.skip("the probe runs on the interpreter")
    limit = 2**31 - 1
    block_b = 128
    b_tiles = triton.cdiv(limit, block_b)
    chunk_a = 2**30 + 16
    out = torch.full((7,), -1, dtype=torch.int64)
    _index_probe_kernel[(1,)](out, b_tiles - 1, 1, 1, chunk_a, 64, limit, 1, limit, BLOCK_A=1, BLOCK_C=1, BLOCK_B=block_b)
    last_b = (b_tiles - 1) * block_b + block_b - 1
    assert out.tolist() == [0, last_b, limit - (b_tiles - 1) * block_b, chunk_a, limit, 0, 64]


def test_operands_of_fake_tensors_are_those_of_real_ones():
    """What torch.compile and AOT dispatch trace the launchers with: an operand that does not fit
    the input's view (a contiguous gradient beside a channels_last input, the reverse, a strided
    slice) is taken in the input's format, with the same strides as on real tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = (2, 3, 5, 4)
    for x_layout, t_layout in (("channels_last", "contiguous"), ("contiguous", "channels_last"), ("contiguous", "sliced")):
        x, t = make_tensor(shape, torch.float32, x_layout), make_tensor(shape, torch.float32, t_layout)
        real, real_strides = partition.operand(t, x, partition.view_of(x))
        with FakeTensorMode() as mode:
            fake_x = mode.from_tensor(x)
            fake, fake_strides = partition.operand(mode.from_tensor(t), fake_x, partition.view_of(fake_x))
        assert (fake_strides, fake.stride()) == (real_strides, real.stride()), (x_layout, t_layout)


def test_a_grid_beyond_cudas_limit_is_refused_by_name():
    view = partition.View(2**31 - 1, 4096, 1, True)
    with pytest.raises(RuntimeError, match="a grid holds at most"):
        partition.tile_grid(view, tiles.ROW_TILES[-1])


# ---------------------------------------------------------------------------------------------
# Tiles: a rule, the same for the module and the functional op, and the tuner.


@pytest.mark.parametrize("shape,rows,tile", [
    ((64, 256, 56, 56), False, (2, 1, 1024)),
    ((64, 1024, 14, 14), False, (4, 1, 256)),
    ((64, 2048, 7, 7), False, (16, 1, 64)),
    ((64, 256, 56, 56), True, (16, 128, 1)),
    ((64, 64, 8, 8), True, (32, 64, 1)),
    ((37, 3), True, (128, 16, 1)),
])
def test_gpu_tile_rule(shape, rows, tile):
    n_channels = shape[1]
    n_inner = 1 if rows else shape[2] * shape[3]
    chosen = tiles.tile_for(n_channels, n_inner, rows, interpreted=False)
    assert (chosen.block_a, chosen.block_c, chosen.block_b) == tile
    assert chosen in tiles.GPU_TILES


def test_reductions_tile_by_their_chunk_on_a_gpu():
    """A planes reduction split along S takes the tile of its chunk, not of the whole row."""
    view = partition.View(1, 2, 2**20, False)
    with partition.as_if_on_gpu(132):
        plan = partition.plan_reduction(view, torch.device("cpu"))
        tile = partition.reduce_tile(view, plan, torch.device("cpu"))
    assert plan.splits_b > 1
    assert tile == tiles.tile_for(2, min(view.inner, plan.chunk_b), False, interpreted=False)


def test_module_and_functional_statistics_are_bitwise_equal():
    """The module op (running buffers updated) and the functional op compute the statistics with
    the same plan and tile: the same bits."""
    x = make_tensor((8, 3, 40, 40), torch.float16)
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    _out, mean, invstd, _mask = triton_ops.bn_act(x, None, None, None, rm, rv, True, 0.1, 1e-5)
    _out2, mean2, invstd2, _var, _mask2 = triton_ops.bn_act_fwd_train(x, None, None, None, 1e-5)
    assert torch.equal(mean, mean2) and torch.equal(invstd, invstd2)


def test_tuner_times_each_key_once_under_two_threads():
    """Two threads' first calls of one key: one times every candidate while the other waits; both
    get the kept tile, and a second key is timed on its own."""
    timed = []
    barrier = threading.Barrier(2)

    def timer(run):
        run()
        timed.append(threading.get_ident())
        return {16: 3.0, 64: 1.0, 128: 2.0}[last_tile[0].block_c]

    last_tile = [None]

    def run_with(tile):
        last_tile[0] = tile

    tuner = tiles.TileTuner(timer)
    results = []

    def first_call():
        barrier.wait()
        results.append(tuner.tile("key", tiles.ROW_TILES, run_with))

    threads = [threading.Thread(target=first_call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tiles.ROW_TILES[1]] * 2
    assert len(timed) == len(tiles.ROW_TILES) and len(set(timed)) == 1
    assert tuner.tile("other", tiles.ROW_TILES[:1], run_with) == tiles.ROW_TILES[0]
    assert len(timed) == len(tiles.ROW_TILES)  # a lone candidate is not timed


def test_two_threads_train_modules_as_one_thread_does():
    """Two threads run training steps of their own modules at once (nn.DataParallel's replicas):
    each gets what the same step gives alone, running statistics included."""
    torch.manual_seed(1)
    shapes = [(4, 5, 6, 6), (6, 3, 9)]
    inputs = [(make_tensor(s, torch.float32), make_tensor(s, torch.float32)) for s in shapes]
    modules = [fused_resnet.nn.BatchNormAddReLU2d(5), fused_resnet.nn.BatchNormAddReLU1d(3)]
    alone = []
    for module, (x, r) in zip(modules, inputs):
        twin = type(module)(module.num_features).to(DEVICE)
        x = x.clone().requires_grad_()
        out = _module_step(twin, x, r)
        alone.append((out.detach(), x.grad, twin.running_mean.clone(), twin.running_var.clone()))

    results = [None, None]
    errors = []
    barrier = threading.Barrier(2)

    def worker(i):
        try:
            module = type(modules[i])(modules[i].num_features).to(DEVICE)
            x = inputs[i][0].clone().requires_grad_()
            barrier.wait()
            out = _module_step(module, x, inputs[i][1])
            results[i] = (out.detach(), x.grad, module.running_mean.clone(), module.running_var.clone())
        except Exception as error:  # reported below, with the thread's traceback lost
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got, expected in zip(results, alone):
        for g, e in zip(got, expected):
            assert torch.equal(g, e)


# ---------------------------------------------------------------------------------------------
# The specialization count.


def test_specialization_count_counts_what_the_jit_compiles():
    """A second call of the same shape compiles nothing new; another dtype or flag does; counted
    without launching, the outputs stay as allocated."""
    x = make_tensor((4, 6, 7, 7), torch.float32)
    rm, rv = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
    with launch.count_specializations(launch=False) as counter, partition.as_if_on_gpu(132):
        triton_ops.bn_act_fwd_eval(x, None, rm, rv, None, None, 1e-5)
        first = len(counter.keys)
        triton_ops.bn_act_fwd_eval(make_tensor(x.shape, torch.float32), None, rm, rv, None, None, 1e-5)
        assert len(counter.keys) == first == 1
        triton_ops.bn_act_fwd_eval(x.half(), None, rm, rv, None, None, 1e-5)
        triton_ops.bn_act_fwd_eval(x, x, rm, rv, None, None, 1e-5)
        assert len(counter.keys) == 3
    assert counter.per_kernel() == {"_bn_act_fwd_apply_kernel": 3}
    (key,) = [k for k in counter.keys if k[1][0][0] == torch.float16]
    assert dict(key[2])["BLOCK_B"] == 64  # the GPU rule's tile for S = 49, not the interpreter's
