"""GPU-only checks of the CUDA backend (skipped elsewhere): every code path of the kernels against
the float64 oracle, the SyncBatchNorm pieces, a tensor of more than 2**31 elements, bitwise
determinism, the current stream and no host synchronization, CUDA graph capture, and
torch.compile(fullgraph=True) with inductor.

The shared suite (FUSED_RESNET_TEST_DEVICE=cuda) covers the module semantics on small shapes; the
shapes here are chosen to reach each kernel path: planes with 16-byte accesses (S a multiple of
16 bytes) and scalar ones (odd S), whose apply passes read the tensor flat in 16-byte vectors that
may span two planes (S at least 16 bytes, aligned pointers), rows (channels_last or S == 1) with
16-byte accesses and scalar ones (C odd), several column tiles (C > 32 accesses), a channel split
over many blocks (large N·S), and a pointer offset by one element (no 16-byte accesses possible).
"""

import pytest
import torch

import fused_resnet
from fused_resnet.contract import op_set_of
from helpers import BACKENDS, DEVICE, assert_close, make_tensor, memory_format_of
from fused_resnet import reference

pytestmark = pytest.mark.skipif(
    DEVICE.type != "cuda" or "cuda" not in BACKENDS,
    reason="needs FUSED_RESNET_TEST_DEVICE=cuda and the CUDA backend (fused_resnet._C built with CUDA)",
)

cxx_ops = op_set_of(torch.ops.fused_resnet) if fused_resnet.EXTENSION_ERROR is None else None

# (shape, layout): the kernel path each one reaches is in the module docstring.
PATH_CASES = [
    ((4, 8, 16, 16), "contiguous"),  # planes, 16-byte accesses
    ((3, 5, 7, 7), "contiguous"),  # planes, scalar (S = 49); apply flat, with a tail of numel % L
    ((4, 6, 3, 3), "contiguous"),  # planes, scalar (S = 9); apply flat, most vectors span two planes
    ((2, 3, 4, 2, 3), "sliced"),  # planes after a copy, small S
    ((2, 64, 8, 8), "channels_last"),  # rows, 16-byte accesses
    ((2, 19, 5, 5), "channels_last"),  # rows, scalar (C odd)
    ((2, 300, 3, 3), "channels_last"),  # rows, several column tiles
    ((37, 70), "contiguous"),  # rows (S == 1)
    ((64, 3, 40, 40), "contiguous"),  # planes, each channel split over many blocks
    ((64, 40, 24, 24), "channels_last"),  # rows, many row blocks
    ((2, 4, 3, 7, 9), "channels_last"),  # rows, 3D
]
CASE_IDS = [f"{'x'.join(map(str, s))}-{l}" for s, l in PATH_CASES]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _offset_by_one(t):
    """The same values, dense in the same layout, at a data pointer 1 element past an allocation."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.permute(*_dense_order(t)).shape).permute(*_inverse(_dense_order(t)))
    view.copy_(t)
    assert view.data_ptr() % 16 != 0 and memory_format_of(view) == memory_format_of(t)
    return view


def _dense_order(t):
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


def _inverse(order):
    return [order.index(d) for d in range(len(order))]


def _params(channels, dtype):
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = torch.rand(channels, dtype=param_dtype, device=DEVICE) + 0.5
    w[::3] *= -1
    b = torch.randn(channels, dtype=param_dtype, device=DEVICE)
    return w, b


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", PATH_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "offset1"])
def test_forward_and_backward_paths(case, dtype, misaligned):
    shape, layout = case
    if misaligned and layout == "sliced":
        pytest.skip("a sliced input is copied first, so its own offset never reaches the kernel")
    x = make_tensor(shape, dtype, layout)
    r = make_tensor(shape, dtype, layout)
    dy = make_tensor(shape, dtype, layout)
    if misaligned:
        x, r, dy = _offset_by_one(x), _offset_by_one(r), _offset_by_one(dy)
    w, b = _params(shape[1], dtype)
    eps = 1e-5

    out, mean, invstd, var, act_mask = cxx_ops.bn_act_fwd_train(x, r, w, b, eps)
    assert act_mask.numel() == 0  # the CUDA kernels keep no ReLU mask (yet)
    ref_out, ref_mean, ref_invstd, ref_var, _ = reference.bn_act_fwd_train(
        x.double(), r.double(), w.double(), b.double(), eps
    )
    assert mean.dtype == invstd.dtype == var.dtype == reference.acc_dtype(dtype)
    assert memory_format_of(out) == memory_format_of(fused_resnet.contract.canonical_layout(x))
    assert_close(out, ref_out, dtype, "out")
    assert_close(mean, ref_mean, dtype, "save_mean")
    assert_close(invstd, ref_invstd, dtype, "save_invstd")
    assert_close(var, ref_var, dtype, "batch_var")

    rm, rv = torch.randn_like(mean), torch.rand_like(var) + 0.5
    eval_out = cxx_ops.bn_act_fwd_eval(x, r, rm, rv, w, b, eps)
    assert_close(eval_out, reference.bn_act_fwd_eval(x.double(), r.double(), rm.double(), rv.double(), w.double(), b.double(), eps), dtype, "eval out")

    # Backward with the kernel's own output (its ReLU mask), against the float64 formula.
    mask_dz = torch.where(out <= 0, torch.zeros_like(dy), dy).double()
    for batch_stats in (True, False):
        for residual_grad in (True, False):
            dx, dr, gw, gb = cxx_ops.bn_act_bwd(dy, out, act_mask, x, w, mean, invstd, batch_stats, residual_grad)
            x_hat = (x.double() - _per_channel(mean.double(), x)) * _per_channel(invstd.double(), x)
            dims = [0] + list(range(2, x.dim()))
            ref_gb = mask_dz.sum(dims)
            ref_gw = (mask_dz * x_hat).sum(dims)
            scale = _per_channel(w.double() * invstd.double(), x)
            if batch_stats:
                m = x.numel() // x.shape[1]
                ref_dx = scale * (mask_dz - _per_channel(ref_gb / m, x) - x_hat * _per_channel(ref_gw / m, x))
            else:
                ref_dx = scale * mask_dz
            what = f"batch_stats={batch_stats} residual_grad={residual_grad}"
            assert_close(dx, ref_dx, dtype, f"grad_input ({what})")
            assert_close(gb, ref_gb, dtype, f"grad_bias ({what})")
            assert_close(gw, ref_gw, dtype, f"grad_weight ({what})")
            assert memory_format_of(dx) == memory_format_of(out)
            if residual_grad:
                assert torch.equal(dr, mask_dz.to(dtype)), what
                assert memory_format_of(dr) == memory_format_of(out)
            else:
                assert dr.numel() == 0


def _per_channel(v, like):
    return v.reshape((1, -1) + (1,) * (like.dim() - 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", PATH_CASES, ids=CASE_IDS)
def test_sync_batchnorm_pieces(case, dtype):
    """bn_stats, bn_act_bwd_reduce and bn_act_bwd_apply against the reference ops in float64."""
    shape, layout = case
    x = make_tensor(shape, dtype, layout, scale=2.0, offset=3.0)  # offset: Welford vs E[x²]−E[x]²
    dy = make_tensor(shape, dtype, layout)
    out = torch.relu(make_tensor(shape, dtype, layout))
    w, _ = _params(shape[1], dtype)

    mean, var = cxx_ops.bn_stats(x)
    ref_mean, ref_var = reference.bn_stats(x.double())
    assert_close(mean, ref_mean, dtype, "mean")
    assert_close(var, ref_var, dtype, "var")

    invstd = torch.rsqrt(var + 1e-5)
    sum_dz_xhat, sum_dz = cxx_ops.bn_act_bwd_reduce(dy, out, x, mean, invstd)
    ref_sdx, ref_sdz = reference.bn_act_bwd_reduce(dy.double(), out.double(), x.double(), mean.double(), invstd.double())
    assert_close(sum_dz_xhat, ref_sdx, dtype, "sum_dz_xhat")
    assert_close(sum_dz, ref_sdz, dtype, "sum_dz")

    # means over a (pretend) larger global batch, as SyncBatchNorm passes them
    m_total = 3 * (x.numel() // x.shape[1])
    mean_dz, mean_dz_xhat = sum_dz / m_total, sum_dz_xhat / m_total
    for residual_grad in (True, False):
        dx, dr = cxx_ops.bn_act_bwd_apply(dy, out, x, w, mean, invstd, mean_dz, mean_dz_xhat, residual_grad)
        ref_dx, ref_dr = reference.bn_act_bwd_apply(
            dy.double(), out.double(), x.double(), w.double(), mean.double(), invstd.double(),
            mean_dz.double(), mean_dz_xhat.double(), residual_grad,
        )
        assert_close(dx, ref_dx, dtype, f"grad_input (residual_grad={residual_grad})")
        if residual_grad:
            assert torch.equal(dr, ref_dr.to(dtype))
        else:
            assert dr.numel() == 0


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 5), (3, 4, 0, 2)], ids=str)
def test_empty_inputs(shape):
    x = torch.randn(shape, device=DEVICE)
    w, b = _params(shape[1], torch.float32)
    out, mean, invstd, var, act_mask = cxx_ops.bn_act_fwd_train(x, None, w, b, 1e-5)
    assert out.shape == x.shape
    ref = reference.bn_act_fwd_train(x, None, w, b, 1e-5)
    for mine, expected in zip((mean, invstd, var), ref[1:4]):
        torch.testing.assert_close(mine, expected)
    assert cxx_ops.bn_act_fwd_eval(x, None, mean, var + 1, w, b, 1e-5).shape == x.shape
    dx, dr, gw, gb = cxx_ops.bn_act_bwd(x, out, act_mask, x, w, mean, invstd, True, True)
    assert dx.shape == dr.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))
    m, v = cxx_ops.bn_stats(x)
    assert torch.equal(m, torch.zeros_like(m)) and torch.equal(v, torch.zeros_like(v))


def _big(shape, layout):
    try:
        x = torch.empty(shape, dtype=torch.float16, device=DEVICE, memory_format=layout)
        out_space = torch.empty_like(x)  # make sure the output fits too
        del out_space
    except torch.OutOfMemoryError:
        pytest.skip(f"not enough GPU memory for a {shape} float16 tensor and its output")
    return x.normal_()


@pytest.mark.parametrize(
    "shape, layout",
    [((1, 2, 2**30 + 24), torch.contiguous_format), ((2**15 + 1, 64, 32, 32), torch.channels_last)],
    ids=["planes", "rows"],
)
def test_more_than_2_31_elements(shape, layout):
    """int64 indexing: eval output and batch statistics of a tensor past 2**31 elements."""
    x = _big(shape, layout)
    assert x.numel() > 2**31
    channels = shape[1]
    rm, rv = torch.randn(channels, device=DEVICE), torch.rand(channels, device=DEVICE) + 0.5
    w, b = _params(channels, torch.float16)
    out = cxx_ops.bn_act_fwd_eval(x, None, rm, rv, w, b, 1e-5)
    assert out.is_contiguous(memory_format=layout)
    scale = w / torch.sqrt(rv + 1e-5)
    shift = b - rm * scale
    # compared in chunks along N (or along L for one sample), never materializing an fp32 copy
    dim = 0 if shape[0] > 1 else 2
    chunk = 4096 if dim == 0 else 2**27
    for xs, ys in zip(x.split(chunk, dim), out.split(chunk, dim)):
        expected = torch.relu(xs.float() * _per_channel(scale, xs) + _per_channel(shift, xs))
        assert_close(ys, expected, torch.float16, "eval output")
    mean, var = cxx_ops.bn_stats(x)
    ref_mean, ref_var = _chunked_mean_var(x, dim)
    assert_close(mean, ref_mean, torch.float32, "mean")
    assert_close(var, ref_var, torch.float32, "var")


def _chunked_mean_var(x, dim):
    """Per-channel mean and biased variance in float64, two passes over chunks along `dim`."""
    chunk = 4096 if dim == 0 else 2**27
    count = x.numel() // x.shape[1]
    reduce = [d for d in range(x.dim()) if d != 1]
    mean = sum(xs.double().sum(reduce) for xs in x.split(chunk, dim)) / count
    centred = sum((xs.double() - _per_channel(mean, xs)).square().sum(reduce) for xs in x.split(chunk, dim))
    return mean, centred / count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bitwise_deterministic(layout, dtype):
    """Reruns give identical bits: the split reductions merge in a fixed order."""
    shape = (32, 64, 28, 28)
    x = make_tensor(shape, dtype, layout)
    r = make_tensor(shape, dtype, layout)
    dy = make_tensor(shape, dtype, layout)
    w, b = _params(shape[1], dtype)
    runs = []
    for _ in range(3):
        out, mean, invstd, var, act_mask = cxx_ops.bn_act_fwd_train(x, r, w, b, 1e-5)
        grads = cxx_ops.bn_act_bwd(dy, out, act_mask, x, w, mean, invstd, True, True)
        runs.append((out, mean, invstd, var) + tuple(grads) + cxx_ops.bn_stats(x))
    for first, other in zip(runs[0], runs[1]):
        assert torch.equal(first, other)
    for first, other in zip(runs[0], runs[2]):
        assert torch.equal(first, other)


def test_current_stream_and_no_host_sync():
    """Kernels run on the caller's current stream, and forward + backward never synchronize."""
    bn = fused_resnet.nn.BatchNormAddReLU2d(16).to(DEVICE)
    x = make_tensor((8, 16, 12, 12), torch.float32, "channels_last").requires_grad_()
    r = make_tensor((8, 16, 12, 12), torch.float32).requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with fused_resnet.use_backend("cuda"), torch.cuda.stream(side):
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = bn(x, r)
            y.backward(torch.ones_like(y))
            bn.eval()
            y_eval = bn(x, r)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    side.synchronize()
    bn_ref = torch.nn.BatchNorm2d(16).to(DEVICE)
    x2, r2 = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    y2 = torch.relu(bn_ref(x2) + r2)
    y2.backward(torch.ones_like(y2))
    assert_close(y, y2, torch.float32, "train output")
    assert_close(x.grad, x2.grad, torch.float32, "grad_input")
    assert_close(bn.running_mean, bn_ref.running_mean, torch.float32, "running_mean")
    bn_ref.eval()
    assert_close(y_eval, torch.relu(bn_ref(x2) + r2), torch.float32, "eval output")


def test_cuda_graph_capture():
    """The ops (workspace allocation and counter reset included) can be captured and replayed."""
    x = make_tensor((16, 32, 14, 14), torch.float32, "channels_last")
    dy = make_tensor(x.shape, torch.float32, "channels_last")
    w, b = _params(32, torch.float32)

    def step():
        out, mean, invstd, _, act_mask = cxx_ops.bn_act_fwd_train(x, None, w, b, 1e-5)
        return (out,) + tuple(cxx_ops.bn_act_bwd(dy, out, act_mask, x, w, mean, invstd, True, False))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for _ in range(2):
        x.copy_(make_tensor(x.shape, torch.float32, "channels_last"))
        graph.replay()
        expected = step()
        for mine, ref in zip(captured, expected):
            assert torch.equal(mine, ref)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_torch_compile_inductor_fullgraph(layout):
    """Fused modules inside an inductor-compiled graph (fullgraph=True: no graph break), with
    elementwise ops around them that inductor generates kernels for: same results as eager."""
    torch._dynamo.reset()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1 = fused_resnet.nn.BatchNormReLU2d(8)
            self.bn2 = fused_resnet.nn.BatchNormAddReLU2d(8)

        def forward(self, x):
            return self.bn2(self.bn1(x * 1.5 + 0.25) * 0.5, x)

    class EagerBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1 = torch.nn.BatchNorm2d(8)
            self.bn2 = torch.nn.BatchNorm2d(8)

        def forward(self, x):
            return torch.relu(self.bn2(torch.relu(self.bn1(x * 1.5 + 0.25)) * 0.5) + x)

    block = Block().to(DEVICE)
    for bn in (block.bn1, block.bn2):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
    twin = EagerBlock().to(DEVICE)
    twin.load_state_dict(block.state_dict())
    compiled = torch.compile(block, fullgraph=True)
    with fused_resnet.use_backend("cuda"):
        for training in (True, False, True):
            block.train(training)
            twin.train(training)
            x = make_tensor((4, 8, 10, 10), torch.float32, layout).requires_grad_()
            x2 = x.detach().clone().requires_grad_()
            y = compiled(x)
            y2 = twin(x2)
            assert_close(y, y2, torch.float32, f"output (training={training})")
            if training:
                y.square().sum().backward()
                y2.square().sum().backward()
                assert_close(x.grad, x2.grad, torch.float32, "grad_input")
                assert_close(block.bn1.weight.grad, twin.bn1.weight.grad, torch.float32, "bn1 grad_weight")
                block.zero_grad()
                twin.zero_grad()
            for name, buf in block.named_buffers():
                assert_close(buf, dict(twin.named_buffers())[name], torch.float32, name)
