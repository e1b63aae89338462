"""The checks of benchmarks/gpu_correctness.py (its docstring says what each one compares): the
float64 oracle's helpers, the op sets under test (and a deliberately broken one), the Triton
specializations compiled so far, and one function per check, which returns its Errors.

Imported by gpu_correctness.py after it has decided TRITON_INTERPRET.
"""

import math
import os
import sys

import torch

import fused_resnet
from fused_resnet.contract import op_set_of
from fused_resnet import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from tolerances import TOLERANCES  # noqa: E402

EPS = 1e-5

# ---------------------------------------------------------------------------------------------
# Inputs and the comparison.


def memory_format(layout, ndim):
    if layout != "channels_last":
        return torch.contiguous_format
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def make(shape, dtype, layout, device, scale=1.0, offset=0.0):
    """Random normal values (never zeros), drawn in float64 and rounded once to dtype."""
    t = (torch.randn(shape, dtype=torch.float64, device=device) * scale + offset).to(dtype)
    return t.contiguous(memory_format=memory_format(layout, len(shape)))


def params(channels, dtype, device):
    """fp32 parameters for fp16/bf16 activations (the AMP case); weights of both signs."""
    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = torch.rand(channels, dtype=pdtype, device=device) + 0.5
    w[::3] *= -1
    b = torch.randn(channels, dtype=pdtype, device=device)
    return w, b


def d(t):
    return None if t is None else t.double()


def per_channel(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def reduce_dims(t):
    return [0] + list(range(2, t.dim()))


def acc_eps(dtype):
    return torch.finfo(reference.acc_dtype(dtype)).eps


def sum_atol_scale(terms, dtype):
    """As tests/helpers.py sum_atol_scale: a per-channel sum of M terms may carry rounding of
    about eps_acc * sqrt(sum of terms²) (a random walk); atol allows 8 such walks."""
    norm = float(terms.pow(2).sum(dim=reduce_dims(terms)).sqrt().max()) if terms.numel() else 0.0
    return max(1.0, 8 * acc_eps(dtype) * norm / TOLERANCES[dtype][0])


def grad_input_gain(weight, invstd):
    """As tests/helpers.py grad_input_gain: grad_input's bracket, a difference of O(|dz|) terms,
    is amplified by |w|·invstd."""
    return max(1.0, float((weight.double().abs() * invstd.double()).max()))


class Errors:
    """The worst comparison of a check: largest |actual - expected| and largest ratio to the
    tolerance atol·scale + rtol·|expected| (inf when actual is not finite where expected is)."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.max_err = 0.0
        self.tol_ratio = 0.0
        self.worst = ""

    def add(self, name, actual, expected, atol_scale=1.0):
        if actual.shape != expected.shape:
            self._note(name, math.inf, math.inf)
            return
        if actual.numel() == 0:
            return
        atol, rtol = TOLERANCES[self.dtype]
        a, e = actual.detach().double(), expected.detach().double()
        diff = (a - e).abs()
        bad = ~torch.isfinite(a) & torch.isfinite(e)
        err = math.inf if bool(bad.any()) else float(diff.max())
        ratio = math.inf if bool(bad.any()) else float((diff / (atol * atol_scale + rtol * e.abs())).max())
        self._note(name, err, ratio)

    def _note(self, name, err, ratio):
        self.max_err = max(self.max_err, err)
        if ratio > self.tol_ratio or not self.worst:
            self.tol_ratio, self.worst = ratio, name

    @property
    def passed(self):
        return self.tol_ratio <= 1.0


# ---------------------------------------------------------------------------------------------
# The op sets under test, and a deliberately broken one.


def op_namespace(backend):
    return op_set_of(torch.ops.fused_resnet_triton if backend == "triton" else torch.ops.fused_resnet)


class Broken:
    """An op namespace whose forward outputs are off by 1: what a wrong kernel would return."""

    def __init__(self, ns):
        self._ns = ns

    def __getattr__(self, name):
        return getattr(self._ns, name)

    def bn_act_fwd_train(self, *args):
        out, *rest = self._ns.bn_act_fwd_train(*args)
        return (out + 1, *rest)

    def bn_act_fwd_eval(self, *args):
        return self._ns.bn_act_fwd_eval(*args) + 1


def break_backend(name):
    """Make every path of `name` (op calls here, and the backend the modules dispatch to) wrong."""
    from fused_resnet import backend as registry

    impl = registry._registry[name]
    ops = impl.ops

    def off_by_one(op):
        def broken(*args):
            result = op(*args)
            return result + 1 if isinstance(result, torch.Tensor) else (result[0] + 1, *result[1:])

        return broken

    impl.ops = ops._replace(
        bn_act=off_by_one(ops.bn_act),
        bn_act_fwd_train=off_by_one(ops.bn_act_fwd_train),
        bn_act_fwd_eval=off_by_one(ops.bn_act_fwd_eval),
    )
    registry._resolved.clear()


# ---------------------------------------------------------------------------------------------
# Triton specializations: each is one JIT compile on the GPU (or a disk-cache hit).


def _jit_functions():
    if "triton" not in fused_resnet.available_backends():
        return []
    from fused_resnet.triton import kernels

    from triton.runtime.jit import JITFunction

    found = []
    for name in dir(kernels):
        obj = getattr(kernels, name)
        # under the interpreter the kernels are InterpretedFunctions: nothing is compiled
        if name.endswith("_kernel") and isinstance(obj, JITFunction):
            found.append(obj)
    return found


def triton_specializations():
    """Compiled kernels held by fused_resnet's Triton JITFunctions, or None under the interpreter
    (which compiles nothing). triton >= 3.2 keeps device -> (kernel_cache, ...) in device_caches,
    older versions device -> {key: kernel} in cache."""
    fns = _jit_functions()
    if not fns:
        return None
    total = 0
    for fn in fns:
        if hasattr(fn, "device_caches"):
            total += sum(len(entry[0]) for entry in fn.device_caches.values())
        else:
            total += sum(len(v) for v in fn.cache.values())
    return total


def check_paths(ns, device, shape, layout, dtype, act="relu", slope=0.01):
    """Both residual settings: training forward, eval, fused backward, SyncBatchNorm pieces, with
    the activation `act` (leaky_relu's negative slope `slope`)."""
    errs = Errors(dtype)
    for residual in (False, True):
        tag = "residual" if residual else "no residual"
        x = make(shape, dtype, layout, device, scale=2.0, offset=1.0)  # offset: Welford vs E[x²]−E[x]²
        r = make(shape, dtype, layout, device) if residual else None
        dy = make(shape, dtype, layout, device)
        w, b = params(shape[1], dtype, device)
        nd = x.dim()

        out, mean, invstd, var, mask = ns.bn_act_fwd_train(x, r, w, b, EPS, act, slope)
        ref_out, ref_mean, ref_invstd, ref_var, _ = reference.bn_act_fwd_train(d(x), d(r), d(w), d(b), EPS, act, slope)
        errs.add(f"fwd_train out ({tag})", out, ref_out)
        errs.add(f"fwd_train save_mean ({tag})", mean, ref_mean)
        errs.add(f"fwd_train save_invstd ({tag})", invstd, ref_invstd)
        errs.add(f"fwd_train batch_var ({tag})", var, ref_var)

        rm = torch.randn_like(mean)
        rv = torch.rand_like(var) + 0.5
        ev = ns.bn_act_fwd_eval(x, r, rm, rv, w, b, EPS, act, slope)
        ref_ev = reference.bn_act_fwd_eval(d(x), d(r), d(rm), d(rv), d(w), d(b), EPS, act, slope)
        errs.add(f"fwd_eval out ({tag})", ev, ref_ev)

        # Backward from the kernel's own out (its mask: the side of a kink), mean and invstd, in
        # float64; a smooth activation's z recomputed from them.
        dz, x_hat = reference._Backward(d(out), d(x), d(r), d(w), d(b), d(mean), d(invstd), act, slope).dz_and_x_hat(d(dy))
        ref_sdx, ref_sdz = (dz * x_hat).sum(reduce_dims(x)), dz.sum(reduce_dims(x))
        sdx_scale, sdz_scale = sum_atol_scale(dz * x_hat, dtype), sum_atol_scale(dz, dtype)
        gain = grad_input_gain(w, invstd)
        m = x.numel() // x.shape[1]
        ref_dx_batch, _ = reference.bn_act_bwd_apply(d(dy), d(out), d(x), d(w), d(mean), d(invstd),
                                                     ref_sdz / m, ref_sdx / m, False, d(r), d(b), act, slope)
        ref_dx_running = per_channel(d(w) * d(invstd), nd) * dz
        for batch_stats in (True, False):
            dx, dr, gw, gb = ns.bn_act_bwd(dy, out, mask, x, w, mean, invstd, batch_stats, residual, r, b, act, slope)
            what = f"({tag}, batch_stats={batch_stats})"
            errs.add(f"bwd grad_input {what}", dx, ref_dx_batch if batch_stats else ref_dx_running, gain)
            errs.add(f"bwd grad_weight {what}", gw, ref_sdx, sdx_scale)
            errs.add(f"bwd grad_bias {what}", gb, ref_sdz, sdz_scale)
            if residual:
                errs.add(f"bwd grad_residual {what}", dr, dz)

        s_mean, s_var = ns.bn_stats(x)
        errs.add(f"bn_stats mean ({tag})", s_mean, ref_mean)
        errs.add(f"bn_stats var ({tag})", s_var, ref_var)
        sdx, sdz = ns.bn_act_bwd_reduce(dy, out, x, mean, invstd, r, w, b, act, slope)
        errs.add(f"bn_act_bwd_reduce sum_dz_xhat ({tag})", sdx, ref_sdx, sdx_scale)
        errs.add(f"bn_act_bwd_reduce sum_dz ({tag})", sdz, ref_sdz, sdz_scale)
        m_total = 3 * m  # means over a pretend global batch, as SyncBatchNorm passes them
        mean_dz, mean_dzx = sdz / m_total, sdx / m_total
        dx, dr = ns.bn_act_bwd_apply(dy, out, x, w, mean, invstd, mean_dz, mean_dzx, residual, r, b, act, slope)
        ref_dx, ref_dr = reference.bn_act_bwd_apply(d(dy), d(out), d(x), d(w), d(mean), d(invstd),
                                                    d(mean_dz), d(mean_dzx), residual, d(r), d(b), act, slope)
        errs.add(f"bn_act_bwd_apply grad_input ({tag})", dx, ref_dx, gain)
        if residual:
            errs.add(f"bn_act_bwd_apply grad_residual ({tag})", dr, ref_dr)
    return errs, ""


def check_bitwise(ns, device, shape, layout, dtype):
    """Every op twice on the same inputs: torch.equal, output by output."""

    def run(x, r, dy, w, b):
        out, mean, invstd, var, mask = ns.bn_act_fwd_train(x, r, w, b, EPS)
        results = [out, mean, invstd, var]
        results += list(ns.bn_act_bwd(dy, out, mask, x, w, mean, invstd, True, True))
        results.append(ns.bn_act_fwd_eval(x, r, mean, var, w, b, EPS))
        results += list(ns.bn_stats(x)) + list(ns.bn_act_bwd_reduce(dy, out, x, mean, invstd))
        return results

    x, r, dy = (make(shape, dtype, layout, device) for _ in range(3))
    w, b = params(shape[1], dtype, device)
    first, second = run(x, r, dy, w, b), run(x, r, dy, w, b)
    names = ["out", "mean", "invstd", "var", "grad_input", "grad_residual", "grad_weight", "grad_bias",
             "eval out", "bn_stats mean", "bn_stats var", "sum_dz_xhat", "sum_dz"]
    errs = Errors(dtype)
    unequal = []
    for name, a, b2 in zip(names, first, second):
        if not torch.equal(a, b2):
            unequal.append(name)
            errs._note(name, float((a.double() - b2.double()).abs().max()), math.inf)
    return errs, ("differ: " + ", ".join(unequal)) if unequal else "all 13 outputs bitwise equal"


def capture(step, warmups=3):
    """(graph, its outputs): step() run `warmups` times on a side stream (JIT compiles and
    workspaces outside the capture), then captured in a CUDA graph; replay() reruns it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph, captured


def check_graph(backend, device, dtype):
    """Forward + backward of BatchNormAddReLU2d captured in a CUDA graph (no host sync, fixed
    workspaces), replayed on new inputs, against the same step run eagerly afterwards."""
    shape = (16, 32, 14, 14)
    bn = fused_resnet.nn.BatchNormAddReLU2d(shape[1]).to(device)
    x = make(shape, dtype, "channels_last", device).requires_grad_()
    r = make(shape, dtype, "channels_last", device).requires_grad_()
    dy = make(shape, dtype, "channels_last", device)

    def step():
        y = bn(x, r)
        return (y,) + torch.autograd.grad(y, (x, r, bn.weight, bn.bias), dy)

    with fused_resnet.use_backend(backend):
        graph, captured = capture(step)
        errs = Errors(dtype)
        for _ in range(2):
            with torch.no_grad():
                x.copy_(make(shape, dtype, "channels_last", device))
                r.copy_(make(shape, dtype, "channels_last", device))
            graph.replay()
            expected = step()
            for name, mine, ref in zip(("out", "grad_input", "grad_residual", "grad_weight", "grad_bias"), captured, expected):
                if not torch.equal(mine, ref):
                    errs._note(f"replay {name}", float((mine.double() - ref.double()).abs().max()), math.inf)
    return errs, "2 replays on new inputs, bitwise equal to eager steps" if errs.passed else "replay differs"


def check_compile(backend, device, dynamo_backend):
    """torch.compile(fullgraph=True) of two fused modules with pointwise ops around them (which
    inductor generates kernels for), training (output, grads, running stats) and eval, against
    the same block in eager float64."""
    import torch.nn.functional as F

    torch._dynamo.reset()
    channels, dtype = 8, torch.float32

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1 = fused_resnet.nn.BatchNormReLU2d(channels)
            self.bn2 = fused_resnet.nn.BatchNormAddReLU2d(channels)

        def forward(self, x):
            return self.bn2(self.bn1(x * 1.5 + 0.25) * 0.5, x)

    def eager64(block, x, training):
        def bn(m, t):
            return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, training, m.momentum, m.eps)

        return torch.relu(bn(block.bn2, torch.relu(bn(block.bn1, x * 1.5 + 0.25)) * 0.5) + x)

    block = Block().to(device)
    for bn in (block.bn1, block.bn2):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
    twin = Block().to(device).double()
    twin.load_state_dict(block.state_dict())
    compiled = torch.compile(block, fullgraph=True, backend=dynamo_backend)
    errs = Errors(dtype)
    with fused_resnet.use_backend(backend):
        for training in (True, False, True):
            block.train(training)
            twin.train(training)
            x = make((4, channels, 10, 10), dtype, "channels_last", device).requires_grad_()
            x64 = x.detach().double().requires_grad_()
            y, y64 = compiled(x), eager64(twin, x64, training)
            errs.add(f"output (training={training})", y, y64)
            if training:
                y.square().sum().backward()
                y64.square().sum().backward()
                # Through two BatchNorms grad_input is amplified by |w|·invstd of each (up to about
                # 1.5 · 3.5 here, the second one's input being relu(...) * 0.5): atol widened 10x.
                errs.add("grad_input", x.grad, x64.grad, 10)
                errs.add("bn1 grad_weight", block.bn1.weight.grad, twin.bn1.weight.grad, 10)
                block.zero_grad()
                twin.zero_grad()
            twin_buffers = dict(twin.named_buffers())
            for name, buf in block.named_buffers():
                if buf.is_floating_point():
                    errs.add(name, buf, twin_buffers[name])
    return errs, f"dynamo backend {dynamo_backend}"


def _channel_stats64(x, c, chunk, along):
    """float64 mean and biased variance of channel c, `chunk` indices of dim `along` at a time."""
    pieces = [p.select(1, c) for p in x.split(chunk, dim=along)]
    count = sum(p.numel() for p in pieces)
    mean = sum(float(p.double().sum()) for p in pieces) / count
    var = sum(float((p.double() - mean).pow(2).sum()) for p in pieces) / count
    return mean, var


def check_big(ns, device, shape, layout, dtype):
    """Eval output and training statistics + output of a tensor past 2**31 elements (int64
    indexing), compared on the first and last channel: batch statistics in float64 chunk by
    chunk, outputs on the first and last slices (the last lie past 2**31 elements)."""
    errs = Errors(dtype)
    fmt = memory_format(layout, len(shape))
    x = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt).normal_()
    channels = shape[1]
    w, b = params(channels, dtype, device)
    rm, rv = torch.randn(channels, device=device), torch.rand(channels, device=device) + 0.5
    along = x.dim() - 1 if layout == "contiguous" else 0  # slices along L (planes), along N (rows)
    width = max(1, min(shape[along] // 4, 2**20 if along else 256))
    slices = [slice(0, width), slice(shape[along] - width, shape[along])]
    chunk = max(1, shape[along] // 8)

    def out_slices(out, mean, var, tag):
        for c in (0, channels - 1):
            for sl in slices:
                index = [slice(None)] * x.dim()
                index[1], index[along] = c, sl
                xs, ys = x[tuple(index)].double(), out[tuple(index)]
                ref = torch.relu((xs - mean[c]) / math.sqrt(var[c] + EPS) * float(w[c]) + float(b[c]))
                errs.add(f"{tag} out, channel {c}, slice {sl.start}:{sl.stop}", ys, ref)

    ev = ns.bn_act_fwd_eval(x, None, rm, rv, w, b, EPS)
    out_slices(ev, rm.double().tolist(), rv.double().tolist(), "eval")
    del ev
    out, mean, invstd, var, _ = ns.bn_act_fwd_train(x, None, w, b, EPS)
    ref_mean, ref_var = [0.0] * channels, [1.0] * channels
    for c in (0, channels - 1):
        ref_mean[c], ref_var[c] = _channel_stats64(x, c, chunk, along)
        errs.add(f"train save_mean channel {c}", mean[c:c + 1], torch.tensor([ref_mean[c]], device=device))
        errs.add(f"train batch_var channel {c}", var[c:c + 1], torch.tensor([ref_var[c]], device=device))
    out_slices(out, ref_mean, ref_var, "train")
    return errs, f"{x.numel()} elements ({x.numel() / 2**31:.3f} x 2**31), {tuple(shape)} {layout}"
