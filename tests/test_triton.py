"""The triton backend's own checks, beside the shared suite that runs it like every backend.

On CPU tensors (CI) the kernels run on the Triton interpreter (helpers.py sets TRITON_INTERPRET);
a second process compiles them for sm_80/sm_90 too, which the interpreter does not. The cases
marked GPU-only run with FUSED_RESNET_TEST_DEVICE=cuda.
"""

import os
import subprocess
import sys

import pytest
import torch

import fused_resnet
from fused_resnet.contract import op_set_of
from helpers import BACKENDS, DEVICE, TRITON_INTERPRETED, assert_close, make_tensor, memory_format_of
from fused_resnet import backend as backend_module
from fused_resnet import reference
from helpers import CONFIGS, DTYPES, run_against_eager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    "triton" not in BACKENDS,
    reason=f"triton backend unavailable for {DEVICE.type} tensors: "
    f"{backend_module._unavailable.get('triton', 'it does not run this device')}",
)
if "triton" in BACKENDS:
    from fused_resnet.triton import partition

    triton_ops = op_set_of(torch.ops.fused_resnet_triton)

ON_GPU = DEVICE.type == "cuda"
GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="GPU-only: run with FUSED_RESNET_TEST_DEVICE=cuda")
DTYPE_PARAMS = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        TRITON_INTERPRETED, reason="the Triton interpreter gives NaN for bfloat16 (a CUDA run covers it)")),
]


@pytest.fixture
def triton_backend():
    with fused_resnet.use_backend("triton"):
        yield


# ---------------------------------------------------------------------------------------------
# Split reductions: shapes whose plan has several splits, so the combine kernels run.

# (shape, layout, axes the plan must split). The GPU aims at 4 programs per SM with at least 32K
# values each, the interpreter at 8 programs with 256 values each (partition._parallelism).
if ON_GPU:
    SPLIT_CASES = [
        ((16, 2, 64, 64), "contiguous", "a"),
        ((1, 2, 256, 512), "contiguous", "b"),
        ((8, 4, 64, 64), "channels_last", "a"),
        ((8, 3, 4, 32, 32), "channels_last", "a"),
        ((100000, 3), "contiguous", "a"),
    ]
else:
    SPLIT_CASES = [
        ((4, 2, 48, 48), "contiguous", "a"),
        ((1, 2, 64, 64), "contiguous", "b"),
        ((4, 3, 40, 40), "channels_last", "a"),
        ((2, 3, 4, 12, 12), "channels_last", "a"),
        ((600, 2), "contiguous", "a"),
    ]
SPLIT_IDS = [f"{s}-{l}" for s, l, _ in SPLIT_CASES]


def _assert_plan_splits(x, axes):
    plan = partition.reduction_plan(x)
    assert plan.num_splits > 1, plan
    assert (plan.splits_a > 1, plan.splits_b > 1) == ("a" in axes, "b" in axes), plan


@pytest.mark.parametrize("shape,layout,axes", SPLIT_CASES, ids=SPLIT_IDS)
def test_split_reduction_matches_eager(triton_backend, shape, layout, axes):
    """Training forward and backward against float64 eager, with statistics and backward sums
    combined from several programs' partials."""
    _assert_plan_splits(make_tensor(shape, torch.float32, layout), axes)
    run_against_eager(shape, layout, True, CONFIGS["default"], DTYPES["fp32"], True, steps=2)


@pytest.mark.parametrize("case", [0, 2], ids=[SPLIT_IDS[0], SPLIT_IDS[2]])
def test_split_reduction_float64_running_statistics(triton_backend, case):
    """bn_act's running-statistics update in the combine kernel, in float64: momentum reaches the
    kernel as two float32 halves, whose sum must keep float64's precision."""
    shape, layout, axes = SPLIT_CASES[case]
    _assert_plan_splits(make_tensor(shape, torch.float64, layout), axes)
    run_against_eager(shape, layout, True, CONFIGS["default"], DTYPES["fp64"], True, steps=2)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_amp_split_training(triton_backend, layout, dtype):
    """Half-precision activations with float32 parameters and running statistics, split reductions."""
    shape, _, axes = SPLIT_CASES[0] if layout == "contiguous" else SPLIT_CASES[2]
    _assert_plan_splits(make_tensor(shape, dtype, layout), axes)
    run_against_eager(shape, layout, True, CONFIGS["default"], (dtype, torch.float32), True, steps=1)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("x_layout,r_layout", [("channels_last", "contiguous"), ("contiguous", "sliced"), ("contiguous", "channels_last")])
def test_operands_in_other_layouts(triton_backend, x_layout, r_layout, training):
    """A residual in another layout than the input, and a broadcast (stride 0) gradient, against
    float64 eager; the outputs keep the input's memory format."""
    shape = (3, 5, 6, 7)
    x = make_tensor(shape, torch.float32, x_layout).requires_grad_()
    r = make_tensor(shape, torch.float32, r_layout).requires_grad_()
    w, b = torch.rand(5, device=DEVICE) + 0.5, torch.randn(5, device=DEVICE)
    rm, rv = torch.randn(5, device=DEVICE), torch.rand(5, device=DEVICE) + 0.5
    y = fused_resnet.functional.batch_norm_add_relu(x, r, rm.clone(), rv.clone(), w, b, training=training)
    y.mean().backward()
    x64, r64 = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
    ref = torch.relu(torch.nn.functional.batch_norm(x64, rm.double(), rv.double(), w.double(), b.double(), training) + r64)
    ref.mean().backward()
    assert memory_format_of(y) == memory_format_of(x) == memory_format_of(x.grad)
    assert_close(y, ref, torch.float32, "output")
    assert_close(x.grad, x64.grad, torch.float32, "grad_input")
    assert_close(r.grad, r64.grad, torch.float32, "grad_residual")


def _sync_inputs(shape, layout, dtype):
    x = make_tensor(shape, dtype, layout, scale=1.5, offset=0.3)
    grad_out = make_tensor(shape, dtype, layout)
    out = make_tensor(shape, dtype, layout)  # only where out <= 0 matters: there dz = 0
    out[out.abs() < 0.3] = 0  # exactly 0 masks the gradient, as relu's backward does
    out[(0,) * len(shape)] = float("nan")  # a NaN passes it (aten's threshold_backward)
    return x, grad_out, out


def _check_sync_ops(shape, layout, dtype):
    """bn_stats, bn_act_bwd_reduce and bn_act_bwd_apply against the reference backend's ops run
    on float64 copies of the same inputs."""
    x, grad_out, out = _sync_inputs(shape, layout, dtype)
    x64, grad_out64, out64 = x.double(), grad_out.double(), out.double()
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    mean, var = triton_ops.bn_stats(x)
    ref_mean, ref_var = reference.bn_stats(x64)
    assert mean.dtype == var.dtype == acc
    assert_close(mean, ref_mean, dtype, "bn_stats mean")
    assert_close(var, ref_var, dtype, "bn_stats var")

    invstd = torch.rsqrt(var + 1e-5)
    sum_dz_xhat, sum_dz = triton_ops.bn_act_bwd_reduce(grad_out, out, x, mean, invstd)
    ref_dzx, ref_dz = reference.bn_act_bwd_reduce(grad_out64, out64, x64, mean.double(), invstd.double())
    assert_close(sum_dz, ref_dz, dtype, "bn_act_bwd_reduce sum_dz")
    assert_close(sum_dz_xhat, ref_dzx, dtype, "bn_act_bwd_reduce sum_dz_xhat")

    channels, count = shape[1], x.numel() // shape[1]
    weight = torch.rand(channels, device=DEVICE, dtype=acc) + 0.5
    mean_dz, mean_dzx = sum_dz / count, sum_dz_xhat / count
    for residual_grad in (True, False):
        grad_input, grad_residual = triton_ops.bn_act_bwd_apply(
            grad_out, out, x, weight, mean, invstd, mean_dz, mean_dzx, residual_grad
        )
        ref_gi, ref_gr = reference.bn_act_bwd_apply(
            grad_out64, out64, x64, weight.double(), mean.double(), invstd.double(),
            mean_dz.double(), mean_dzx.double(), residual_grad,
        )
        assert grad_input.dtype == dtype and memory_format_of(grad_input) == memory_format_of(x)
        assert_close(grad_input, ref_gi, dtype, "bn_act_bwd_apply grad_input")
        if residual_grad:
            assert_close(grad_residual, ref_gr, dtype, "bn_act_bwd_apply grad_residual")
        else:
            assert grad_residual.numel() == 0


@pytest.mark.parametrize("shape,layout,axes", SPLIT_CASES, ids=SPLIT_IDS)
def test_sync_ops_split_match_reference(shape, layout, axes):
    _assert_plan_splits(make_tensor(shape, torch.float32, layout), axes)
    _check_sync_ops(shape, layout, torch.float32)


@pytest.mark.parametrize("dtype", DTYPE_PARAMS + [torch.float64])
@pytest.mark.parametrize(
    "shape,layout",
    [((5, 3), "contiguous"), ((3, 4, 7), "sliced"), ((2, 5, 3, 6), "channels_last"),
     ((2, 3, 2, 3, 5), "channels_last"), ((3, 2, 4, 5), "contiguous")],
)
def test_sync_ops_match_reference(shape, layout, dtype):
    _check_sync_ops(shape, layout, dtype)


def test_sync_ops_empty_batch():
    x = torch.randn(0, 3, 4, device=DEVICE)
    mean, var = triton_ops.bn_stats(x)
    assert torch.equal(mean, torch.zeros(3, device=DEVICE)) and torch.equal(var, torch.zeros(3, device=DEVICE))
    sum_dzx, sum_dz = triton_ops.bn_act_bwd_reduce(x, x, x, mean, var)
    assert torch.equal(sum_dz, torch.zeros(3, device=DEVICE)) and torch.equal(sum_dzx, torch.zeros(3, device=DEVICE))
    grad_input, grad_residual = triton_ops.bn_act_bwd_apply(x, x, x, None, mean, var, mean, var, True)
    assert grad_input.shape == grad_residual.shape == x.shape


# ---------------------------------------------------------------------------------------------
# Determinism: no atomics, partials merged in a fixed order.


@pytest.mark.parametrize("shape,layout,axes", SPLIT_CASES[:3], ids=SPLIT_IDS[:3])
def test_split_reduction_is_bitwise_deterministic(triton_backend, shape, layout, axes):
    x = make_tensor(shape, torch.float32, layout, scale=2.0, offset=1.0).requires_grad_()
    r = make_tensor(shape, torch.float32, layout).requires_grad_()
    grad_out = make_tensor(shape, torch.float32, layout)
    _assert_plan_splits(x, axes)
    results = []
    for _ in range(2):
        y = fused_resnet.functional.batch_norm_add_relu(x, r, None, None, training=True)
        grads = torch.autograd.grad(y, (x, r), grad_out)
        results.append((y,) + grads + triton_ops.bn_stats(x.detach()))
    for first, again in zip(*results):
        assert torch.equal(first, again)


# ---------------------------------------------------------------------------------------------
# Registration: backend choice, import failures (the schemas: test_contract.py; opcheck: test_opcheck.py).

def test_backend_listing_and_auto():
    assert "triton" in fused_resnet.available_backends(DEVICE)
    auto = backend_module.resolve(DEVICE).name
    if DEVICE.type == "cpu":  # the interpreter is for testing: never "auto"'s pick
        assert auto != "triton"
        assert fused_resnet.available_backends(DEVICE)[-1] == "triton"
    with fused_resnet.use_backend("triton"):
        assert backend_module.resolve(DEVICE).name == "triton"


def _run_python(code, **env):
    full_env = dict(os.environ, PYTHONPATH=ROOT, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env)


def test_missing_triton_marks_backend_unavailable():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # makes `import triton` fail\n"
        "import fused_resnet, torch\n"
        "assert 'triton' not in fused_resnet.available_backends()\n"
        "try:\n"
        "    fused_resnet.set_backend('triton')\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
        "y = fused_resnet.nn.BatchNormReLU2d(3)(torch.randn(2, 3, 4, 4))\n"
        "print('ok', tuple(y.shape))\n"
    )
    result = _run_python(code, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    assert "triton is not installed or failed to import" in result.stdout
    assert "ok (2, 3, 4, 4)" in result.stdout


@pytest.mark.skipif(torch.version.cuda is not None or torch.version.hip is not None, reason="a CUDA build always registers triton for CUDA tensors")
def test_cpu_build_without_interpreter_says_how_to_get_triton():
    result = _run_python(
        "import fused_resnet; fused_resnet.set_backend('triton')", TRITON_INTERPRET="0"
    )
    assert result.returncode != 0
    assert "set TRITON_INTERPRET=1 before importing fused_resnet" in result.stderr


def test_kernels_compile_for_gpu():
    """Every kernel compiles for sm_90 (and the interpreter's leniency hides nothing)."""
    script = os.path.join(ROOT, "tests", "compile_triton_kernels.py")
    result = subprocess.run(
        [sys.executable, script, "90"], capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="0"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sm_90: compiled" in result.stdout


# ---------------------------------------------------------------------------------------------
# GPU-only.


@GPU_ONLY
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eval_beyond_int32_offsets(triton_backend, layout):
    """More than 2**31 elements: offsets past 2**31 must not wrap. Checked against torch on the
    first and last batch entries."""
    shape = (33, 4, 4096, 4096)  # 2.2e9 elements, 4.4 GB in bfloat16
    assert torch.Size(shape).numel() > 2**31
    x = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE, memory_format=
                    torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    x.normal_()
    rm, rv = torch.randn(4, device=DEVICE), torch.rand(4, device=DEVICE) + 0.5
    w, b = torch.rand(4, device=DEVICE) + 0.5, torch.randn(4, device=DEVICE)
    y = fused_resnet.functional.batch_norm_relu(x, rm, rv, w, b, training=False)
    for n in (0, shape[0] - 1):
        ref = torch.relu(torch.nn.functional.batch_norm(x[n:n + 1].float(), rm, rv, w, b, False, 0.0, 1e-5))
        assert_close(y[n:n + 1], ref, torch.bfloat16, f"batch entry {n}")
    del x, y
    torch.cuda.empty_cache()


@GPU_ONLY
def test_compile_fullgraph_inductor(triton_backend):
    """torch.compile(fullgraph=True) with inductor sees into the Triton kernels: a conv block with
    a fused module, forward and backward, against the same block run eagerly."""
    torch._dynamo.reset()
    block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), fused_resnet.nn.BatchNormReLU2d(8))
    block = block.to(DEVICE).to(memory_format=torch.channels_last)
    eager_block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), fused_resnet.nn.BatchNormReLU2d(8))
    eager_block = eager_block.to(DEVICE).to(memory_format=torch.channels_last)
    eager_block.load_state_dict(block.state_dict())
    compiled = torch.compile(block, fullgraph=True)
    for _ in range(2):
        x = make_tensor((4, 8, 16, 16), torch.float32, "channels_last").requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        out, ref = compiled(x), eager_block(x2)
        assert_close(out, ref, torch.float32, "output")
        out.sum().backward()
        ref.sum().backward()
        assert_close(x.grad, x2.grad, torch.float32, "grad_input")
        assert_close(block[1].weight.grad, eager_block[1].weight.grad, torch.float32, "grad_weight")
        assert_close(block[1].running_var, eager_block[1].running_var, torch.float32, "running_var")
