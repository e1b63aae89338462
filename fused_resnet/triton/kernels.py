"""Triton kernels of the fused BatchNorm (+ residual add) + ReLU. Launchers: launchers.py; the
tile each launch uses: tiles.py.

Every kernel sees a tensor as a 3D view [n_outer, n_channels, n_inner] given by three strides per
tensor, and works on tiles [BLOCK_A, BLOCK_C, BLOCK_B] of it:
  NC* (contiguous)        [N, C, S]      strides (C*S, S, 1): tiles run along S (BLOCK_B lanes)
  channels_last(_3d), 2D  [N*S, C, 1]    strides (C, 1, -):   tiles run along C (BLOCK_C lanes)
so one kernel serves 1D, 2D and 3D inputs and both memory formats, and a stride of 1 (which Triton
specializes) makes the loads coalesced along the fastest dimension. Per-channel vectors (weight,
bias, the statistics) are read through a stride of their own, so a strided or expanded weight
reads what the user passed.

Index arithmetic is int64 throughout (program ids, tile starts, split bounds, offsets): the view
admits n_outer and n_inner up to 2**31 - 1 each, and N*C*S may exceed 2**31; int32 tile starts
and chunk ends would wrap within one block of that.

Specialization: Triton compiles one variant per combination of constexpr flags, dtypes, pointer
alignment and integer "== 1" / "% 16 == 0" properties. Sizes that only count loop trips or pick
a split (n_outer, chunk_a, splits_b, num_splits, count) and the per-channel strides are
`do_not_specialize`; the strides of activations, n_channels and n_inner (whose divisibility lets
the compiler vectorize masked loads along the fastest dimension) and chunk_b stay specialized.

Notation (per channel c, over the M = n_outer * n_inner values of that channel):
  mean = Σx / M,  var = Σ(x - mean)² / M (biased),  invstd = 1 / sqrt(var + eps)
  x̂ = (x - mean) * invstd,  y = relu(x̂ * w + b (+ r)),  dz = 0 where y <= 0 else dy.
Accumulation is in float32 (float64 for float64 inputs); activations load and store in their own
dtype. Python floats reach compiled Triton as float32, so eps and momentum arrive as the 64 bits
of their float64 value (an int64 argument, `_float_arg`): exact in float64, rounded once to
float32 for the float32 accumulation.

Reductions are split along the reduction dimensions (n_outer, n_inner) into a grid of
splits_a x splits_b rectangles, one program per (channel block, rectangle); each program writes
its partial results for its channels, and a combine kernel merges them in a fixed order. No
atomics, and the tile is chosen by a rule (tiles.py), never by timing: results are bitwise
reproducible for a given device and shape. With a single rectangle the partial kernel writes the
final results itself (SINGLE_SPLIT), with no second launch.
"""

import triton
import triton.language as tl

# Arguments every kernel leaves unspecialized (those it has): see the module docstring.
_UNSPECIALIZED = (
    "n_outer", "chunk_a", "splits_b", "num_splits", "count", "eps_bits", "momentum_bits",
    "stride_running_mean", "stride_running_var", "stride_mean", "stride_spread", "stride_invstd",
    "stride_w", "stride_b", "stride_sum_dz", "stride_sum_dz_xhat", "slope_bits",
)


def _jit(fn):
    """triton.jit with the arguments of _UNSPECIALIZED that fn has left unspecialized."""
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[name for name in _UNSPECIALIZED if name in names])


# ---------------------------------------------------------------------------------------------
# Helpers.


@triton.jit
def _acc(v):
    """To the accumulation dtype: float64 stays float64, float16/bfloat16/float32 become float32."""
    if v.dtype == tl.float64:
        return v
    else:
        return v.to(tl.float32)


@triton.jit
def _int64(v):
    """An int argument as int64 (Triton may have specialized an argument equal to 1 to a constant)."""
    return v + tl.zeros([], dtype=tl.int64)


@triton.jit
def _float_arg(bits, dtype: tl.constexpr):
    """A float64 argument passed as its 64 bits (an int64), in `dtype`."""
    return _int64(bits).to(tl.float64, bitcast=True).to(dtype)


@triton.jit
def _offsets(a, c, b, stride_a, stride_c, stride_b):
    """int64 offsets of the tile a x c x b ([BLOCK_A], [BLOCK_C], [BLOCK_B] indices)."""
    return (
        a.to(tl.int64)[:, None, None] * stride_a
        + c.to(tl.int64)[None, :, None] * stride_c
        + b.to(tl.int64)[None, None, :] * stride_b
    )


@triton.jit
def _channel_load(ptr, stride, c, c_mask, other):
    """The per-channel vector at ptr (stride `stride`: any, 0 for an expanded one), channels c."""
    return tl.load(ptr + c.to(tl.int64) * stride, mask=c_mask, other=other)


@triton.jit
def _split_bounds(split, splits_b, chunk_a, chunk_b, n_outer, n_inner):
    """The rectangle [a_begin, a_end) x [b_begin, b_end) of the reduction that `split` covers, int64."""
    split = _int64(split)
    a_begin = (split // splits_b) * chunk_a
    b_begin = (split % splits_b) * chunk_b
    return a_begin, tl.minimum(a_begin + chunk_a, n_outer), b_begin, tl.minimum(b_begin + chunk_b, n_inner)


@triton.jit
def _split_counts(splits, splits_b, chunk_a, chunk_b, n_outer, n_inner):
    """Number of values per channel in each split of the vector `splits` (as in _split_bounds)."""
    splits = splits.to(tl.int64)
    a_begin = (splits // splits_b) * chunk_a
    b_begin = (splits % splits_b) * chunk_b
    a_len = tl.minimum(a_begin + chunk_a, n_outer) - a_begin
    b_len = tl.minimum(b_begin + chunk_b, n_inner) - b_begin
    return a_len * b_len


@triton.jit
def _tile_position(pid, n_outer, n_channels, n_inner, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_B: tl.constexpr):
    """int64 indices and the mask of tile `pid` in a flat 1D grid, n_inner tiles fastest, then
    channels, so neighbouring programs touch neighbouring memory in both views."""
    pid = _int64(pid)
    b_tiles = tl.cdiv(_int64(n_inner), BLOCK_B)
    c_tiles = tl.cdiv(_int64(n_channels), BLOCK_C)
    b = (pid % b_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)
    c = ((pid // b_tiles) % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    a = (pid // (b_tiles * c_tiles)) * BLOCK_A + tl.arange(0, BLOCK_A)
    c_mask = c < n_channels
    mask = (a < n_outer)[:, None, None] & c_mask[None, :, None] & (b < n_inner)[None, None, :]
    return a, c, b, c_mask, mask


@triton.jit
def _channel_block(pid, n_channels, BLOCK_C: tl.constexpr):
    """The channels of channel block `pid` (int64) and their mask."""
    c = _int64(pid) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < n_channels


@triton.jit
def _store_partials(first_ptr, second_ptr, split, n_channels, c, c_mask, first, second):
    """A split reduction's two partials of channels c, row `split` of [num_splits, n_channels]."""
    part = _int64(split) * n_channels + c
    tl.store(first_ptr + part, first, mask=c_mask)
    tl.store(second_ptr + part, second, mask=c_mask)


@triton.jit
def _update_running(mean_ptr, var_ptr, stride_mean, stride_var, c, c_mask, mean, var,
                    momentum_bits, per_channel):
    """bn_act's running-statistics update of channels c (csrc/common/running_stats.h states it):
      running_mean <- (1 - momentum)·running_mean + momentum·mean
      running_var  <- (1 - momentum)·running_var  + momentum·var·M/(M - 1)
    in the accumulation dtype of `mean`, stored in each buffer's dtype."""
    acc = mean.dtype
    momentum = _float_arg(momentum_bits, acc)
    m = _int64(per_channel).to(acc)
    keep = 1.0 - momentum
    take_var = momentum * (m / (m - 1.0))
    mean_offsets = c.to(tl.int64) * stride_mean
    var_offsets = c.to(tl.int64) * stride_var
    old_mean = tl.load(mean_ptr + mean_offsets, mask=c_mask, other=0.0).to(acc)
    old_var = tl.load(var_ptr + var_offsets, mask=c_mask, other=0.0).to(acc)
    new_mean = old_mean * keep + mean * momentum
    new_var = old_var * keep + var * take_var
    tl.store(mean_ptr + mean_offsets, new_mean.to(mean_ptr.dtype.element_ty), mask=c_mask)
    tl.store(var_ptr + var_offsets, new_var.to(var_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _finalize_stats(mean_ptr, var_ptr, invstd_ptr, c, c_mask, mean, m2, count, eps_bits):
    """The statistics of channels c from their moments: var = M2 / count, invstd = 1/sqrt(var + eps)."""
    var = m2 / count
    eps = _float_arg(eps_bits, var.dtype)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(var_ptr + c, var, mask=c_mask)
    tl.store(invstd_ptr + c, 1.0 / tl.sqrt(var + eps), mask=c_mask)
    return var


# The ACT constexpr: the index of the activation in contract.ACTIVATIONS (docs/design.md,
# "Activations"); launchers.py passes it.
ACT_RELU = tl.constexpr(0)
ACT_RELU6 = tl.constexpr(1)
ACT_LEAKY_RELU = tl.constexpr(2)
ACT_IDENTITY = tl.constexpr(3)
ACT_SILU = tl.constexpr(4)
ACT_HARDSWISH = tl.constexpr(5)
ACT_GELU = tl.constexpr(6)
ACT_GELU_TANH = tl.constexpr(7)


@triton.jit
def _const(value: tl.constexpr, like):
    """`value` in like's dtype, exactly where it is float64 (a bare float literal is a float32)."""
    return tl.full([], value, like.dtype)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(u):
    """tanh(u) = 1 - 2 / (exp(2u) + 1): ±1 where exp over- or underflows."""
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _activation(z, ACT: tl.constexpr, slope):
    """out = act(z), z in the accumulation dtype. relu, relu6 and leaky_relu keep a NaN, as eager."""
    if ACT == ACT_RELU:
        return tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == ACT_RELU6:
        return tl.minimum(tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL), 6.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == ACT_LEAKY_RELU:
        return tl.where(z > 0, z, z * slope)
    elif ACT == ACT_IDENTITY:
        return z
    elif ACT == ACT_SILU:
        return z * _sigmoid(z)
    elif ACT == ACT_HARDSWISH:
        return z * tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif ACT == ACT_GELU:  # z·Φ(z)
        return 0.5 * z * (1.0 + tl.math.erf(z * _const(0.7071067811865476, z)))
    else:  # ACT_GELU_TANH: 0.5·z·(1 + tanh(√(2/π)·(z + 0.044715·z³)))
        return 0.5 * z * (1.0 + _tanh(_const(0.7978845608028654, z) * (z + _const(0.044715, z) * z * z * z)))


@triton.jit
def _activation_grad(dy, out, z, ACT: tl.constexpr, slope):
    """dz = dy · d out / dz in the accumulation dtype: from out for the piecewise-linear
    activations (compared in out's own dtype; a NaN out passes dy where eager's backward passes
    it), from the recomputed z for the smooth ones (eager's formulas), dy for identity."""
    if ACT == ACT_RELU:  # aten's threshold_backward
        return _acc(tl.where(out <= 0, tl.zeros_like(dy), dy))
    elif ACT == ACT_RELU6:  # hardtanh_backward
        return _acc(tl.where((out <= 0) | (out >= 6), tl.zeros_like(dy), dy))
    elif ACT == ACT_LEAKY_RELU:  # leaky_relu_backward: out > 0 exactly where z > 0 (slope >= 0)
        g = _acc(dy)
        return tl.where(out > 0, g, g * slope)
    elif ACT == ACT_IDENTITY:
        return _acc(dy)
    elif ACT == ACT_SILU:
        sig = _sigmoid(z)
        return _acc(dy) * (sig * (1.0 + z * (1.0 - sig)))
    elif ACT == ACT_HARDSWISH:  # 0 below -3, z/3 + 1/2 up to 3, 1 above: hardswish_backward
        g = _acc(dy)
        return tl.where(z < -3.0, tl.zeros_like(g), tl.where(z <= 3.0, g * (z / 3.0 + 0.5), g))
    elif ACT == ACT_GELU:  # Φ(z) + z·φ(z)
        cdf = 0.5 * (1.0 + tl.math.erf(z * _const(0.7071067811865476, z)))
        pdf = tl.exp(-0.5 * z * z) * _const(0.3989422804014327, z)
        return _acc(dy) * (cdf + z * pdf)
    else:  # ACT_GELU_TANH, as gelu_backward(approximate="tanh")
        k = _const(0.7978845608028654, z)
        kappa = _const(0.044715, z)
        t = _tanh(k * (z + kappa * z * z * z))
        return _acc(dy) * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3.0 * kappa * z * z))


@triton.jit
def _pre_activation(x, mean, invstd, w_ptr, stride_w, b_ptr, stride_b, r_ptr, r_offsets, c, c_mask, mask,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """z = (x - mean)·invstd·w + b (+ r), recomputed in the backward (accumulation dtype)."""
    scale = invstd
    if HAS_WEIGHT:
        scale *= _acc(_channel_load(w_ptr, stride_w, c, c_mask, 0.0)).to(invstd.dtype)
    z = (x - mean[None, :, None]) * scale[None, :, None]
    if HAS_BIAS:
        z += _acc(_channel_load(b_ptr, stride_b, c, c_mask, 0.0)).to(invstd.dtype)[None, :, None]
    if HAS_RESIDUAL:
        z += _acc(tl.load(r_ptr + r_offsets, mask=mask, other=0.0)).to(invstd.dtype)
    return z


# ---------------------------------------------------------------------------------------------
# Training forward: statistics.


@_jit
def _bn_fwd_stats_kernel(
    x_ptr, stride_xa, stride_xc, stride_xb,
    mean_part_ptr, m2_part_ptr,  # [num_splits, n_channels] partials, accumulation dtype
    mean_ptr, var_ptr, invstd_ptr,  # [n_channels] results, written here when SINGLE_SPLIT
    running_mean_ptr, running_var_ptr, stride_running_mean, stride_running_var,
    momentum_bits,
    n_outer, n_channels, n_inner, chunk_a, chunk_b, splits_b, eps_bits,
    SINGLE_SPLIT: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Welford partials (mean, M2) of one split rectangle for BLOCK_C channels; with a single
    split, the final statistics and (UPDATE_RUNNING) the running statistics' update.

    Each tile is reduced exactly (its mean, then Σ(x - tile mean)²) and merged into the running
    partial with Chan's formula, for n = running count, k = tile count:
      mean += δ·k/(n+k),  M2 += M2_tile + δ²·n·k/(n+k),  δ = mean_tile - mean.
    Memory traffic: one read of x.
    """
    c, c_mask = _channel_block(tl.program_id(0), n_channels, BLOCK_C)
    split = tl.program_id(1)
    a_begin, a_end, b_begin, b_end = _split_bounds(split, splits_b, chunk_a, chunk_b, n_outer, n_inner)

    zero = _acc(tl.zeros([BLOCK_C], dtype=x_ptr.dtype.element_ty))
    count = zero
    mean = zero
    m2 = zero
    for a0 in range(a_begin, a_end, BLOCK_A):
        a = a0 + tl.arange(0, BLOCK_A)
        for b0 in range(b_begin, b_end, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            mask = (a < a_end)[:, None, None] & c_mask[None, :, None] & (b < b_end)[None, None, :]
            x = _acc(tl.load(x_ptr + _offsets(a, c, b, stride_xa, stride_xc, stride_xb), mask=mask, other=0.0))
            tile_count = (tl.minimum(a_end - a0, BLOCK_A) * tl.minimum(b_end - b0, BLOCK_B)).to(zero.dtype)
            tile_mean = tl.sum(tl.sum(x, axis=2), axis=0) / tile_count
            deviation = tl.where(mask, x - tile_mean[None, :, None], 0.0)
            tile_m2 = tl.sum(tl.sum(deviation * deviation, axis=2), axis=0)
            new_count = count + tile_count
            delta = tile_mean - mean
            mean += delta * (tile_count / new_count)
            m2 += tile_m2 + delta * delta * (count * (tile_count / new_count))
            count = new_count

    if SINGLE_SPLIT:
        var = _finalize_stats(mean_ptr, var_ptr, invstd_ptr, c, c_mask, mean, m2, count, eps_bits)
        if UPDATE_RUNNING:
            _update_running(running_mean_ptr, running_var_ptr, stride_running_mean, stride_running_var,
                            c, c_mask, mean, var, momentum_bits, _int64(n_outer) * n_inner)
    else:
        _store_partials(mean_part_ptr, m2_part_ptr, split, n_channels, c, c_mask, mean, m2)


@_jit
def _bn_fwd_stats_combine_kernel(
    mean_part_ptr, m2_part_ptr, mean_ptr, var_ptr, invstd_ptr,
    running_mean_ptr, running_var_ptr, stride_running_mean, stride_running_var,
    momentum_bits,
    n_outer, n_channels, n_inner, chunk_a, chunk_b, splits_b, num_splits, eps_bits,
    UPDATE_RUNNING: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge the Welford partials of every split, in split order (Chan et al. for many groups):
      mean = Σ n_k·mean_k / M,  M2 = Σ (M2_k + n_k·(mean_k - mean)²),  var = M2 / M,
    then (UPDATE_RUNNING) the running statistics' update.
    Two passes over the partials, BLOCK_S splits at a time; deviations from the final mean keep
    the merge stable however the partials differ.
    """
    c, c_mask = _channel_block(tl.program_id(0), n_channels, BLOCK_C)
    zero = tl.zeros([BLOCK_C], dtype=mean_part_ptr.dtype.element_ty)
    total = (_int64(n_outer) * n_inner).to(zero.dtype)

    weighted = zero
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < num_splits)[:, None] & c_mask[None, :]
        part = s.to(tl.int64)[:, None] * n_channels + c[None, :]
        counts = _split_counts(s, splits_b, chunk_a, chunk_b, n_outer, n_inner).to(zero.dtype)
        means = tl.load(mean_part_ptr + part, mask=mask, other=0.0)
        weighted += tl.sum(tl.where(mask, means * counts[:, None], 0.0), axis=0)
    mean = weighted / total

    m2 = zero
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < num_splits)[:, None] & c_mask[None, :]
        part = s.to(tl.int64)[:, None] * n_channels + c[None, :]
        counts = _split_counts(s, splits_b, chunk_a, chunk_b, n_outer, n_inner).to(zero.dtype)
        deviation = tl.load(mean_part_ptr + part, mask=mask, other=0.0) - mean[None, :]
        m2s = tl.load(m2_part_ptr + part, mask=mask, other=0.0)
        m2 += tl.sum(tl.where(mask, m2s + counts[:, None] * deviation * deviation, 0.0), axis=0)

    var = _finalize_stats(mean_ptr, var_ptr, invstd_ptr, c, c_mask, mean, m2, total, eps_bits)
    if UPDATE_RUNNING:
        _update_running(running_mean_ptr, running_var_ptr, stride_running_mean, stride_running_var,
                        c, c_mask, mean, var, momentum_bits, _int64(n_outer) * n_inner)


# ---------------------------------------------------------------------------------------------
# Forward apply (training and eval).


@_jit
def _bn_act_fwd_apply_kernel(
    x_ptr, stride_xa, stride_xc, stride_xb,
    r_ptr, stride_ra, stride_rc, stride_rb,
    y_ptr,  # allocated like x: x's strides
    mean_ptr, stride_mean, spread_ptr, stride_spread, w_ptr, stride_w, b_ptr, stride_b, eps_bits, slope_bits,
    n_outer, n_channels, n_inner,
    BATCH_STATS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """y = act((x - mean)·scale + b (+ r)), scale = w·invstd folded once per channel.

    spread is invstd when BATCH_STATS (training: the batch statistics), else the running
    variance (eval: invstd = 1/sqrt(var + eps)). Memory traffic: read x (and r), write y.
    """
    a, c, b, c_mask, mask = _tile_position(tl.program_id(0), n_outer, n_channels, n_inner, BLOCK_A, BLOCK_C, BLOCK_B)
    mean = _acc(_channel_load(mean_ptr, stride_mean, c, c_mask, 0.0))
    spread = _acc(_channel_load(spread_ptr, stride_spread, c, c_mask, 1.0))
    if BATCH_STATS:
        scale = spread
    else:
        scale = 1.0 / tl.sqrt(spread + _float_arg(eps_bits, spread.dtype))
    if HAS_WEIGHT:
        scale *= _acc(_channel_load(w_ptr, stride_w, c, c_mask, 0.0))
    x = _acc(tl.load(x_ptr + _offsets(a, c, b, stride_xa, stride_xc, stride_xb), mask=mask, other=0.0))
    z = (x - mean[None, :, None]) * scale[None, :, None]
    if HAS_BIAS:
        z += _acc(_channel_load(b_ptr, stride_b, c, c_mask, 0.0))[None, :, None]
    if HAS_RESIDUAL:
        z += _acc(tl.load(r_ptr + _offsets(a, c, b, stride_ra, stride_rc, stride_rb), mask=mask, other=0.0))
    y = _activation(z, ACT, _float_arg(slope_bits, z.dtype))
    tl.store(y_ptr + _offsets(a, c, b, stride_xa, stride_xc, stride_xb), y.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Backward: reductions.


@_jit
def _bn_act_bwd_reduce_kernel(
    dy_ptr, stride_dya, stride_dyc, stride_dyb,
    out_ptr, stride_oa, stride_oc, stride_ob,
    x_ptr, stride_xa, stride_xc, stride_xb,
    r_ptr, stride_ra, stride_rc, stride_rb,  # read to recompute z (HAS_RESIDUAL)
    mean_ptr, stride_mean, invstd_ptr, stride_invstd,  # accumulation dtype
    w_ptr, stride_w, b_ptr, stride_b, slope_bits,
    sum_dz_part_ptr, sum_dz_xmu_part_ptr,  # [num_splits, n_channels]: Σdz, Σdz·(x - mean), acc dtype
    sum_dz_ptr, sum_dz_xhat_ptr,  # [n_channels] results, written here when SINGLE_SPLIT
    n_outer, n_channels, n_inner, chunk_a, chunk_b, splits_b,
    SINGLE_SPLIT: tl.constexpr, ACT: tl.constexpr, RECOMPUTE_Z: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Σdz and Σdz·(x - mean) over one split rectangle; Σdz·x̂ = invstd·Σdz·(x - mean) is taken
    at the end (no E[dz·x] - mean·E[dz] cancellation). dz from out (piecewise-linear
    activations) or from z recomputed from x (and r): RECOMPUTE_Z. Memory traffic: read dy, x, and
    y or r."""
    c, c_mask = _channel_block(tl.program_id(0), n_channels, BLOCK_C)
    split = tl.program_id(1)
    a_begin, a_end, b_begin, b_end = _split_bounds(split, splits_b, chunk_a, chunk_b, n_outer, n_inner)
    mean = _channel_load(mean_ptr, stride_mean, c, c_mask, 0.0)
    slope = _float_arg(slope_bits, mean.dtype)
    if RECOMPUTE_Z:
        invstd_z = _channel_load(invstd_ptr, stride_invstd, c, c_mask, 0.0)

    sum_dz = tl.zeros([BLOCK_C], dtype=mean_ptr.dtype.element_ty)
    sum_dz_xmu = sum_dz
    for a0 in range(a_begin, a_end, BLOCK_A):
        a = a0 + tl.arange(0, BLOCK_A)
        for b0 in range(b_begin, b_end, BLOCK_B):
            b = b0 + tl.arange(0, BLOCK_B)
            mask = (a < a_end)[:, None, None] & c_mask[None, :, None] & (b < b_end)[None, None, :]
            dy = tl.load(dy_ptr + _offsets(a, c, b, stride_dya, stride_dyc, stride_dyb), mask=mask, other=0.0)
            x = tl.load(x_ptr + _offsets(a, c, b, stride_xa, stride_xc, stride_xb), mask=mask, other=0.0)
            centered = _acc(x).to(sum_dz.dtype) - mean[None, :, None]
            if RECOMPUTE_Z:
                z = _pre_activation(_acc(x).to(sum_dz.dtype), mean, invstd_z, w_ptr, stride_w, b_ptr, stride_b,
                                    r_ptr, _offsets(a, c, b, stride_ra, stride_rc, stride_rb), c, c_mask, mask,
                                    HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL)
                dz = _activation_grad(dy, dy, z, ACT, slope).to(sum_dz.dtype)
            else:
                out = tl.load(out_ptr + _offsets(a, c, b, stride_oa, stride_oc, stride_ob), mask=mask, other=0.0)
                dz = _activation_grad(dy, out, centered, ACT, slope).to(sum_dz.dtype)
            sum_dz += tl.sum(tl.sum(dz, axis=2), axis=0)
            sum_dz_xmu += tl.sum(tl.sum(dz * centered, axis=2), axis=0)

    if SINGLE_SPLIT:
        invstd = _channel_load(invstd_ptr, stride_invstd, c, c_mask, 0.0)
        tl.store(sum_dz_ptr + c, sum_dz, mask=c_mask)
        tl.store(sum_dz_xhat_ptr + c, sum_dz_xmu * invstd, mask=c_mask)
    else:
        _store_partials(sum_dz_part_ptr, sum_dz_xmu_part_ptr, split, n_channels, c, c_mask, sum_dz, sum_dz_xmu)


@_jit
def _bn_act_bwd_reduce_combine_kernel(
    sum_dz_part_ptr, sum_dz_xmu_part_ptr, invstd_ptr, stride_invstd, sum_dz_ptr, sum_dz_xhat_ptr,
    n_channels, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Sum the partials of every split in split order: Σdz, and Σdz·x̂ = invstd·Σdz·(x - mean)."""
    c, c_mask = _channel_block(tl.program_id(0), n_channels, BLOCK_C)
    sum_dz = tl.zeros([BLOCK_C], dtype=sum_dz_part_ptr.dtype.element_ty)
    sum_dz_xmu = sum_dz
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        mask = (s < num_splits)[:, None] & c_mask[None, :]
        part = s.to(tl.int64)[:, None] * n_channels + c[None, :]
        sum_dz += tl.sum(tl.load(sum_dz_part_ptr + part, mask=mask, other=0.0), axis=0)
        sum_dz_xmu += tl.sum(tl.load(sum_dz_xmu_part_ptr + part, mask=mask, other=0.0), axis=0)
    invstd = _channel_load(invstd_ptr, stride_invstd, c, c_mask, 0.0)
    tl.store(sum_dz_ptr + c, sum_dz, mask=c_mask)
    tl.store(sum_dz_xhat_ptr + c, sum_dz_xmu * invstd, mask=c_mask)


# ---------------------------------------------------------------------------------------------
# Backward: apply.


@_jit
def _bn_act_bwd_apply_kernel(
    dy_ptr, stride_dya, stride_dyc, stride_dyb,
    out_ptr, stride_oa, stride_oc, stride_ob,
    x_ptr, stride_xa, stride_xc, stride_xb,
    dx_ptr, dr_ptr,  # allocated like x: x's strides
    r_ptr, stride_ra, stride_rc, stride_rb,  # read to recompute z (HAS_RESIDUAL)
    w_ptr, stride_w, mean_ptr, stride_mean, invstd_ptr, stride_invstd,  # mean, invstd: acc dtype
    b_ptr, stride_b, slope_bits,
    sum_dz_ptr, stride_sum_dz, sum_dz_xhat_ptr, stride_sum_dz_xhat, count,  # Σdz, Σdz·x̂ over `count` values
    n_outer, n_channels, n_inner,
    BATCH_STATS: tl.constexpr, HAS_WEIGHT: tl.constexpr, WRITE_GRAD_RESIDUAL: tl.constexpr,
    ACT: tl.constexpr, RECOMPUTE_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """grad_input = w·invstd·(dz - mean_dz - x̂·mean_dz_xhat) with batch statistics,
    w·invstd·dz with running statistics; grad_residual = dz.
    Memory traffic: read dy and y (and x with batch statistics), write dx (and dr)."""
    a, c, b, c_mask, mask = _tile_position(tl.program_id(0), n_outer, n_channels, n_inner, BLOCK_A, BLOCK_C, BLOCK_B)
    invstd = _channel_load(invstd_ptr, stride_invstd, c, c_mask, 0.0)
    scale = invstd
    if HAS_WEIGHT:
        scale *= _acc(_channel_load(w_ptr, stride_w, c, c_mask, 0.0)).to(invstd.dtype)
    dy = tl.load(dy_ptr + _offsets(a, c, b, stride_dya, stride_dyc, stride_dyb), mask=mask, other=0.0)
    x_offsets = _offsets(a, c, b, stride_xa, stride_xc, stride_xb)
    slope = _float_arg(slope_bits, invstd.dtype)
    if RECOMPUTE_Z:
        z = _pre_activation(_acc(tl.load(x_ptr + x_offsets, mask=mask, other=0.0)).to(invstd.dtype),
                            _channel_load(mean_ptr, stride_mean, c, c_mask, 0.0), invstd, w_ptr, stride_w,
                            b_ptr, stride_b, r_ptr, _offsets(a, c, b, stride_ra, stride_rc, stride_rb), c, c_mask,
                            mask, HAS_WEIGHT, HAS_BIAS, HAS_RESIDUAL)
        g = _activation_grad(dy, dy, z, ACT, slope).to(invstd.dtype)
    else:
        out = tl.load(out_ptr + _offsets(a, c, b, stride_oa, stride_oc, stride_ob), mask=mask, other=0.0)
        g = _activation_grad(dy, out, out, ACT, slope).to(invstd.dtype)
    if WRITE_GRAD_RESIDUAL:
        tl.store(dr_ptr + x_offsets, g.to(dr_ptr.dtype.element_ty), mask=mask)
    if BATCH_STATS:
        mean = _channel_load(mean_ptr, stride_mean, c, c_mask, 0.0)
        denominator = _int64(count).to(invstd.dtype)
        mean_dz = _channel_load(sum_dz_ptr, stride_sum_dz, c, c_mask, 0.0) / denominator
        mean_dz_xhat = _channel_load(sum_dz_xhat_ptr, stride_sum_dz_xhat, c, c_mask, 0.0) / denominator
        x = _acc(tl.load(x_ptr + x_offsets, mask=mask, other=0.0)).to(invstd.dtype)
        x_hat = (x - mean[None, :, None]) * invstd[None, :, None]
        g = g - mean_dz[None, :, None] - x_hat * mean_dz_xhat[None, :, None]
    tl.store(dx_ptr + x_offsets, (g * scale[None, :, None]).to(dx_ptr.dtype.element_ty), mask=mask)
