// Forward CPU kernels: bn_act_fwd_train (batch statistics) and bn_act_fwd_eval (running
// statistics), y = act(x·scale + shift (+ r)) with per-channel scale = w·invstd and
// shift = b − mean·scale, computed in the accumulation type, the activation a compile-time
// constant of the kernels (act_math.h: dispatch_act picks one instantiation per activation); and
// bn_stats, the statistics of bn_act_fwd_train alone (same code, so the same bits), for
// SyncBatchNorm.
//
// Statistics: each block of at most kBlockBytes of one channel is reduced exactly by two passes
// over L1-resident data (sum → block mean, then Σ(x − block mean)²); blocks, chunks and threads
// are combined with Chan's formula in a fixed order, so results are deterministic for a given
// thread count. Never E[x²] − E[x]².
//
// Planes layout [N][C][S]: when there are enough channels, one task owns a channel: it reduces
// the channel's N planes, then applies the normalization to them while they are still in L2, so
// the training forward reads x from memory once (the same traffic as eval). With few channels,
// each channel is split into P parts: partial moments, an ordered merge, then the apply pass
// over the same parts (same thread, same data).
// Rows layout [N*S][C]: each thread reduces a contiguous chunk of rows into per-position
// partials (vectorized along C), the chunks are merged in order, and each thread applies its
// own chunk; for a piecewise-linear activation the training forward's apply also writes the
// mask bits (act_mask, for bn_act_bwd: 1 bit per element instead of re-reading out).
#include "fwd_apply.h"
#include "host.h"
#include "stats.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <vector>

namespace fused_resnet::cpu {

namespace {

// ------------------------------------------------------------------------------------------
// Training forward.

template <typename T>
struct TrainArgs {
  const T* x;
  const T* r;  // nullptr without residual
  T* y;
  int64_t N, C, S;
  const acc_type<T>* w;
  const acc_type<T>* b;
  double eps;
  acc_type<T>* mean_out;
  acc_type<T>* invstd_out;
  acc_type<T>* var_out;
  MaskWord* act_mask;  // rows layout, piecewise-linear activation: the mask bits (act_mask.h)
  RunningStatsUpdate<acc_type<T>> running;  // applied per channel by finalize_stats
  bool stream;  // the apply pass streams y past the cache (use_streaming_stores)
};

// From the merged moments of channel c: writes the statistics, updates the running ones, and
// returns (scale, shift).
template <typename T>
C10_ALWAYS_INLINE std::pair<acc_type<T>, acc_type<T>> finalize_stats(
    const TrainArgs<T>& a, const Moments<acc_type<T>>& m, int64_t c) {
  using A = acc_type<T>;
  const auto [mean, var] = biased_mean_var(m);
  // invstd in double, rounded once (as aten's batch_norm does)
  const double invstd = 1.0 / std::sqrt(static_cast<double>(var) + a.eps);
  const double scale = static_cast<double>(a.w[c]) * invstd;
  const double shift = static_cast<double>(a.b[c]) - static_cast<double>(mean) * scale;
  a.mean_out[c] = mean;
  a.var_out[c] = var;
  a.invstd_out[c] = static_cast<A>(invstd);
  a.running.template apply<T>(c, mean, var);
  return {static_cast<A>(scale), static_cast<A>(shift)};
}

// The planes layout's apply when its planes are short (S < kShortPlane: a small input's last
// stages, 4x4, 2x2): plane by plane they would run mostly through the scalar path (SiLU: a
// scalar exp per element; bn_silu 4x1152x2x2 took 3x eager's time). The channels go in blocks
// of at most kShortPlaneBlock positions instead: a block's scale and shift repeated per position
// into buffers on the stack (L1), then its span of every sample (contiguous, cb·S values) in
// whole vectors. The blocks are the parallel tasks, so each per-position value is written once
// a call (repeating them over a whole sample, C·S values each, into heap vectors cost as much
// as a 4x4 or 2x2 layer's apply: 0.85-0.90x eager's eval there).
template <typename T, typename Fn, bool kRes>
void apply_short_planes(
    bool stream, int64_t N, int64_t C, int64_t S, T* y, const T* x, const T* r,
    const acc_type<T>* scale, const acc_type<T>* shift, const Fn& act) {
  using A = acc_type<T>;
  const int64_t W = C * S;
  const ShortPlaneBlocks blocks(N, C, S, kActParallelMinElems<Fn>);
  at::parallel_for(0, blocks.count, blocks.grain, [&](int64_t b0, int64_t b1) {
    A sc[kShortPlaneBlock], sh[kShortPlaneBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = blocks.begin(b), c1 = blocks.end(b);
      repeat_block(sc, scale + c0, c1 - c0, S);
      repeat_block(sh, shift + c0, c1 - c0, S);
      const int64_t L = (c1 - c0) * S;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = n * W + c0 * S;
        fwd_apply_span<T, Fn, kRes, true>(
            stream, y + o, x + o, kRes ? r + o : nullptr, L, sc, sh, act);
      }
    }
    if (stream) {
      stream_fence();
    }
  });
}

template <typename T, typename Fn, bool kRes>
void train_planes(const TrainArgs<T>& a, const Fn& act) {
  using A = acc_type<T>;
  if (a.S < kShortPlane<T>) {
    // every channel's statistics, then the apply by blocks of channels
    std::vector<Moments<A>> moments(a.C);
    short_planes_moments(a.x, a.N, a.C, a.S, moments.data());
    std::vector<A> scale(a.C), shift(a.C);
    for (int64_t c = 0; c < a.C; ++c) {
      std::tie(scale[c], shift[c]) = finalize_stats(a, moments[c], c);
    }
    apply_short_planes<T, Fn, kRes>(
        a.stream, a.N, a.C, a.S, a.y, a.x, a.r, scale.data(), shift.data(), act);
    return;
  }

  const PlaneTasks tasks(a.N, a.C, a.S, at::get_num_threads());
  if (tasks.P == 1) {
    // channel-local: statistics + apply in one task, the channel stays in L2 in between
    at::parallel_for(0, tasks.count(), tasks.grain(), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Moments<A> m = task_moments(a.x, tasks, c);
        const auto [scale, shift] =
            finalize_stats(a, m, c);
        tasks.for_each_span(c, [&](int64_t o, int64_t len) {
          fwd_apply_span<T, Fn, kRes, false>(
              a.stream, a.y + o, a.x + o, kRes ? a.r + o : nullptr, len, &scale, &shift, act);
        });
      }
      if (a.stream) {
        stream_fence();
      }
    });
    return;
  }

  // split: partial moments of every part, an ordered merge, then the apply pass over the same
  // parts (same static partition)
  std::vector<Moments<A>> moments(a.C);
  planes_moments(a.x, tasks, moments.data());
  std::vector<A> scale(a.C), shift(a.C);
  for (int64_t c = 0; c < a.C; ++c) {
    std::tie(scale[c], shift[c]) =
        finalize_stats(a, moments[c], c);
  }
  at::parallel_for(0, tasks.count(), tasks.grain(), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = tasks.channel(t);
      tasks.for_each_span(t, [&](int64_t o, int64_t len) {
        fwd_apply_span<T, Fn, kRes, false>(
            a.stream, a.y + o, a.x + o, kRes ? a.r + o : nullptr, len, &scale[c], &shift[c], act);
      });
    }
    if (a.stream) {
      stream_fence();
    }
  });
}

template <typename T, typename Fn, bool kRes>
void train_rows(const TrainArgs<T>& a, const Fn& act) {
  using A = acc_type<T>;
  const int64_t C = a.C;
  const RowPlan plan(C, a.N * a.S, VecT<T>::kStep, at::get_num_threads());

  std::vector<Moments<A>> moments(C);
  rows_moments(a.x, plan, moments.data());
  std::vector<A> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    std::tie(scale[c], shift[c]) =
        finalize_stats(a, moments[c], c);
  }
  repeat_channels(scale, C, plan.W);
  repeat_channels(shift, C, plan.W);

  // apply: chunk p by the thread that reduced it (same static partition)
  auto apply = [&](auto keep_mask) {
    constexpr bool kMask = decltype(keep_mask)::value;
    at::parallel_for(0, plan.P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        fwd_apply_chunk<T, Fn, kRes, kMask>(
            a.stream, plan, p, a.y, a.x, a.r, scale.data(), shift.data(), act, a.act_mask);
      }
      if (a.stream) {
        stream_fence();
      }
    });
  };
  if constexpr (kMaskable<T, Fn>) {
    if (rows_keep_mask<T, Fn>(plan)) {
      apply(std::true_type{});
      return;
    }
  }
  apply(std::false_type{});
  if constexpr (Fn::kReadsOut) {
    // no mask kept where one is returned: defined contents, which bn_act_bwd does not read
    std::fill(a.act_mask, a.act_mask + act_mask_bytes(a.N * a.S * C), MaskWord(0));
  }
}

// ------------------------------------------------------------------------------------------
// Eval forward: one pass.

template <typename T, typename Fn, bool kRes>
void eval_kernel(
    bool stream, const View& g, const T* x, const T* r, T* y, const acc_type<T>* scale,
    const acc_type<T>* shift, const Fn& act) {
  using A = acc_type<T>;
  const int64_t N = g.N, C = g.C, S = g.S;
  if (!g.rows && S < kShortPlane<T>) {
    apply_short_planes<T, Fn, kRes>(stream, N, C, S, y, x, r, scale, shift, act);
    return;
  }
  if (!g.rows) {
    // flat range over all elements, cut at plane boundaries
    const int64_t total = N * C * S;
    at::parallel_for(0, total, kActParallelMinElems<Fn>, [&](int64_t e0, int64_t e1) {
      int64_t e = e0;
      while (e < e1) {
        const int64_t plane = e / S;
        const int64_t s = e - plane * S;
        const int64_t len = std::min(S - s, e1 - e);
        const int64_t c = plane % C;
        fwd_apply_span<T, Fn, kRes, false>(
            stream, y + e, x + e, kRes ? r + e : nullptr, len, scale + c, shift + c, act);
        e += len;
      }
      if (stream) {
        stream_fence();
      }
    });
    return;
  }
  const RowPlan plan(C, N * S, VecT<T>::kStep, at::get_num_threads());
  const int64_t W = plan.W, G = plan.G;
  std::vector<A> sc(scale, scale + C), sh(shift, shift + C);
  repeat_channels(sc, C, W);
  repeat_channels(sh, C, W);
  const int64_t units = G + (plan.Rl > 0 ? 1 : 0);
  const int64_t grain = std::max<int64_t>(1, kActParallelMinElems<Fn> / W);
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    const int64_t full_end = std::min(u1, G);
    if (full_end > u0) {
      const int64_t o = u0 * W;
      fwd_apply_rows<T, Fn, kRes>(
          stream, y + o, x + o, kRes ? r + o : nullptr, full_end - u0, W, sc.data(), sh.data(),
          act);
    }
    if (u1 > G) {
      const int64_t ol = G * W;
      fwd_apply_span<T, Fn, kRes, true>(
          stream, y + ol, x + ol, kRes ? r + ol : nullptr, plan.Rl * C, sc.data(), sh.data(), act);
    }
    if (stream) {
      stream_fence();
    }
  });
}

} // namespace

TrainOutputs fwd_train_cpu(
    const FwdOperands& in, const OptTensor& weight, const OptTensor& bias, double eps,
    const RunningBuffers* running) {
  constexpr const char* op = "bn_act_fwd_train";
  const View& g = in.g;
  const bool has_res = in.residual.defined();
  at::Tensor out = empty_activation(g);
  at::Tensor mean = empty_channel_stat(g);
  at::Tensor invstd = empty_channel_stat(g);
  at::Tensor var = empty_channel_stat(g);
  // the rows layout's mask of a piecewise-linear activation (act_mask.h), for bn_act_bwd; zeros
  // where the kernel keeps none (train_rows); empty for the other activations
  at::Tensor act_mask = at::empty(
      {cpu_act_mask_bytes(g, backward_reads_out(in.act.kind))}, g.x.options().dtype(at::kByte));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_type<scalar_t>;
    std::vector<A> w(g.C), b(g.C);
    read_param<A>(weight, g.C, A(1), w.data());
    read_param<A>(bias, g.C, A(0), b.data());
    TrainArgs<scalar_t> a;
    a.x = g.x.const_data_ptr<scalar_t>();
    a.r = has_res ? in.residual.const_data_ptr<scalar_t>() : nullptr;
    a.y = out.mutable_data_ptr<scalar_t>();
    a.N = g.N;
    a.C = g.C;
    a.S = g.S;
    a.w = w.data();
    a.b = b.data();
    a.eps = eps;
    a.mean_out = mean.mutable_data_ptr<A>();
    a.invstd_out = invstd.mutable_data_ptr<A>();
    a.var_out = var.mutable_data_ptr<A>();
    a.act_mask = act_mask.mutable_data_ptr<MaskWord>();
    a.running = running_stats_update<A>(running, g.M());
    // bytes of activations touched: x (read twice unless it stays in cache), r, y
    const int64_t bytes = g.numel() * int64_t(sizeof(scalar_t)) * (has_res ? 3 : 2);
    a.stream = use_streaming_stores(bytes, Pass::kTwo);
    dispatch_act(in.act.kind, [&](auto act_c) {
      using Fn = ActFn<decltype(act_c)::value, A>;
      const Fn act(in.act.negative_slope);
      dispatch_bool(has_res, [&](auto res_c) {
        constexpr bool kRes = decltype(res_c)::value;
        if (g.rows) {
          train_rows<scalar_t, Fn, kRes>(a, act);
        } else {
          train_planes<scalar_t, Fn, kRes>(a, act);
        }
      });
    });
  });
  return {out, mean, invstd, var, act_mask};
}

at::Tensor fwd_eval_cpu(
    const FwdOperands& in, const at::Tensor& running_mean, const at::Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, double eps) {
  constexpr const char* op = "bn_act_fwd_eval";
  const View& g = in.g;
  const bool has_res = in.residual.defined();
  at::Tensor out = empty_activation(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_type<scalar_t>;
    const int64_t C = g.C;
    std::vector<A> w(C), b(C), rm(C), rv(C), scale(C), shift(C);
    read_param<A>(weight, C, A(1), w.data());
    read_param<A>(bias, C, A(0), b.data());
    read_param<A>(running_mean, C, A(0), rm.data());
    read_param<A>(running_var, C, A(1), rv.data());
    for (int64_t c = 0; c < C; ++c) {
      const double invstd = 1.0 / std::sqrt(static_cast<double>(rv[c]) + eps);
      const double s = static_cast<double>(w[c]) * invstd;
      scale[c] = static_cast<A>(s);
      shift[c] = static_cast<A>(static_cast<double>(b[c]) - static_cast<double>(rm[c]) * s);
    }
    const scalar_t* x = g.x.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const scalar_t* rp = has_res ? in.residual.const_data_ptr<scalar_t>() : nullptr;
    const int64_t bytes = g.numel() * int64_t(sizeof(scalar_t)) * (has_res ? 3 : 2);
    const bool stream = use_streaming_stores(bytes, Pass::kOne);
    dispatch_act(in.act.kind, [&](auto act_c) {
      using Fn = ActFn<decltype(act_c)::value, A>;
      const Fn act(in.act.negative_slope);
      dispatch_bool(has_res, [&](auto res_c) {
        eval_kernel<scalar_t, Fn, decltype(res_c)::value>(
            stream, g, x, rp, y, scale.data(), shift.data(), act);
      });
    });
  });
  return out;
}

TensorPair stats_cpu(const View& g) {
  constexpr const char* op = "bn_stats";
  at::Tensor mean = empty_channel_stat(g);
  at::Tensor var = empty_channel_stat(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_type<scalar_t>;
    std::vector<Moments<A>> moments(g.C);
    channel_moments(g, g.x.const_data_ptr<scalar_t>(), moments.data());
    A* mean_out = mean.mutable_data_ptr<A>();
    A* var_out = var.mutable_data_ptr<A>();
    for (int64_t c = 0; c < g.C; ++c) {
      std::tie(mean_out[c], var_out[c]) = biased_mean_var(moments[c]);
    }
  });
  return {mean, var};
}

} // namespace fused_resnet::cpu
