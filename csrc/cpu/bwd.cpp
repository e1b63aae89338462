// Backward CPU kernels: bn_act_bwd (of both forwards). Its two passes are also SyncBatchNorm's
// separate ops, bn_act_bwd_reduce (the sums) and bn_act_bwd_apply (dx, dr from given global
// means of the sums): bwd_pieces.cpp, built from the same reduce and apply code.
//
//   dz = grad_out·act'(.)                           (act_math.h; dz_of in bwd_spans.h)
//        piecewise linear: from out's side (relu: (out <= 0) ? 0 : grad_out, aten's
//                          threshold_backward, NaN out passes), or the act_mask bits
//        smooth:           from z = (x − mean)·invstd·w + b (+ r) recomputed, with the mean and
//                          invstd given (batch or running statistics alike)
//        identity:         grad_out
//   grad_bias = Σdz,  grad_weight = Σdz·x̂ = invstd·Σdz·(x − mean)
//   grad_input = A·dz + B·(x − mean) + D,  A = w·invstd,
//       B = −A·invstd·grad_weight/M, D = −A·grad_bias/M     when batch_stats
//       B = D = 0 (x is not even read)                       otherwise
//   grad_residual = dz                                       when residual_grad
//   bn_act_bwd_apply: B = −A·invstd·mean_dz_xhat, D = −A·mean_dz  (means over all processes)
//
// One reduce pass (reads dy, x, and y for a piecewise-linear activation or r for a smooth one with
// a residual) and one apply pass (reads the same; writes dx, dr); in the rows layout and in short
// planes a smooth activation has the reduce pass write dz into dr (grad_residual) or, for a
// derivative with exp, erf or tanh, into dx, and the apply pass read dz and x (kReduceKeepsDz). The
// activation is a compile-time constant of the kernels (dispatch_act), and so is whether a
// recomputed z adds a residual. Sums are two-level: fp32 (double for double) vector accumulators
// over a block, then added to a double total in a fixed order (deterministic for a given thread
// count). Layouts and parallel decomposition mirror the forward (fwd.cpp): in the planes layout a
// channel-local task keeps the channel's inputs in L2 between its two passes; in the rows layout
// each thread reduces and then applies its own contiguous chunk of rows, and bn_act_bwd takes a
// piecewise-linear activation's side as bits instead of reading y: those bn_act_fwd_train saved
// (act_mask; then y is not read at all), or else bits its reduce pass records for its apply pass
// (RowMask).
#include "bwd_host.h"
#include "bwd_planes.h"
#include "bwd_rows.h"
#include "bwd_short_planes.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <type_traits>
#include <vector>

namespace fused_resnet::cpu {

namespace {

// ------------------------------------------------------------------------------------------
// bn_act_bwd on a non-empty input: the reduce and apply passes; planes with enough channels run
// channel-local (a task keeps its channel's dy, y, x in L2 between the two), rows reduce and
// apply the same chunk on the same thread.

// Where the parameter gradients go: grad_weight = Σdz·x̂ (sum_dz_xhat), grad_bias = Σdz (sum_dz).
template <typename T>
struct ParamGrads {
  bool batch_stats;
  acc_type<T>* sum_dz_xhat;  // Σdz·x̂
  acc_type<T>* sum_dz;       // Σdz
};

// Writes channel c's parameter gradients and returns its coefficients.
template <typename T>
C10_ALWAYS_INLINE Coef<acc_type<T>> finalize_grads(
    const BwdArgs<T>& a, const ParamGrads<T>& pg, int64_t c, const Sums& s, int64_t M) {
  using A = acc_type<T>;
  const A sum_dz_xhat = sum_dz_xhat_of(s, a.invstd[c]);
  pg.sum_dz_xhat[c] = sum_dz_xhat;
  const A sum_dz = static_cast<A>(s.sum_dz);
  pg.sum_dz[c] = sum_dz;
  if (pg.batch_stats && M > 0) {
    return batch_coef(a.w[c], a.invstd[c], sum_dz_xhat, sum_dz, A(1) / A(M));
  }
  return running_coef(a.w[c], a.invstd[c]);
}

template <typename T, typename Fn, bool kRes, typename F>
void bwd_planes(const BwdArgs<T>& a, const ParamGrads<T>& pg, const Fn& act) {
  using A = acc_type<T>;
  const PlaneTasks tasks(a.N, a.C, a.S, at::get_num_threads());
  if (tasks.P == 1) {
    // channel-local: reduce + apply in one task, the channel's dy, x (and y or r) stay in L2
    at::parallel_for(0, tasks.count(), tasks.grain(), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Coef<A> k =
            finalize_grads(a, pg, c, task_sums<T, Fn, kRes>(a, tasks, c, act), tasks.M);
        apply_task<T, Fn, kRes, F>(a, tasks, c, k, act);
      }
      if (a.stream) {
        stream_fence();
      }
    });
    return;
  }
  std::vector<Sums> sums(a.C);
  planes_sums<T, Fn, kRes>(a, tasks, sums.data(), act);
  std::vector<Coef<A>> coef(a.C);
  for (int64_t c = 0; c < a.C; ++c) {
    coef[c] = finalize_grads(a, pg, c, sums[c], tasks.M);
  }
  planes_apply<T, Fn, kRes, F>(a, tasks, coef.data(), act);
}

// A smooth activation's dz (an exp per element for SiLU) is computed once, by the reduce pass,
// and kept (float and double, whose dz is exact in T) where that costs no traffic or less time
// than a second evaluation; the apply pass is then the identity activation's over dz, reading
// dz and x instead of dy, x and r:
//   grad_residual requested: into dr (= dz, an output anyway): the same traffic.
//   otherwise, a derivative with exp, erf or tanh (kTranscendentalGrad): into dx, which the
//     apply pass overwrites in place: one more write and read of an activation instead of an
//     evaluation (bn_silu 8x64x56x56 channels_last training 1.26 -> 1.10 ms on the 2-core VM,
//     bn_gelu 2.84 -> 2.11; hardswish's cheap derivative gained nothing, so it recomputes).
template <typename T, typename Fn, typename F>
constexpr bool kReduceKeepsDz = Fn::kRecomputesZ && std::is_same_v<T, acc_type<T>> &&
    (F::kResGrad || Fn::kTranscendentalGrad);

// Where a kept dz goes: dr when grad_residual is requested, else dx.
template <typename T, typename F>
T* kept_dz_of(const BwdArgs<T>& a) {
  return F::kResGrad ? a.dr : a.dx;
}

// The apply pass over a kept dz: the identity activation's, with dy := dz (in dr, or in dx: then
// in place) and nothing else read; dr, if requested, already holds dz.
template <typename T>
using KeptDzAct = ActFn<Act::kIdentity, acc_type<T>>;
template <typename F>
using KeptDzFlags = BwdFlags<F::kBatchStats, false>;
template <typename T>
BwdArgs<T> over_kept_dz(const BwdArgs<T>& a, T* kept_dz) {
  BwdArgs<T> over = a;
  over.dy = kept_dz;
  over.y = nullptr;
  over.r = nullptr;
  over.dr = nullptr;
  return over;
}

template <typename T, typename Fn, bool kRes, typename F>
void bwd_rows(const BwdArgs<T>& a, const ParamGrads<T>& pg, const Fn& act) {
  using A = acc_type<T>;
  const RowPlan plan(a.C, a.N * a.S, VecT<T>::kStep, at::get_num_threads());
  const RowParams<A> pp = repeated_params(a, plan);
  std::vector<Sums> sums(a.C);
  const RowMask mask = row_mask<T, Fn>(plan, a.act_mask);
  constexpr bool kKeepDz = kReduceKeepsDz<T, Fn, F>;
  T* const kept_dz = kept_dz_of<T, F>(a);
  rows_sums<T, Fn, kRes, kKeepDz>(a, plan, pp, sums.data(), act, mask, kKeepDz ? kept_dz : nullptr);
  std::vector<Coef<A>> coef(a.C);
  for (int64_t c = 0; c < a.C; ++c) {
    coef[c] = finalize_grads(a, pg, c, sums[c], a.N * a.S);
  }
  const RowCoefs<A> k(coef, plan.W);
  if constexpr (kKeepDz) {
    rows_apply<T, KeptDzAct<T>, false, KeptDzFlags<F>>(
        over_kept_dz(a, kept_dz), plan, k, pp, KeptDzAct<T>(0.0));
  } else {
    rows_apply<T, Fn, kRes, F>(a, plan, k, pp, act, mask.bits());
  }
}

// Short planes (bwd_short_planes.h): blocks of channels, each over every sample; dz kept as in
// the rows layout (kReduceKeepsDz).
template <typename T, typename Fn, bool kRes, typename F>
void bwd_short_planes(const BwdArgs<T>& a, const ParamGrads<T>& pg, const Fn& act) {
  using A = acc_type<T>;
  constexpr bool kKeepDz = kReduceKeepsDz<T, Fn, F>;
  T* const kept_dz = kept_dz_of<T, F>(a);
  std::vector<Sums> sums(a.C);
  short_planes_sums<T, Fn, kRes, kKeepDz>(a, sums.data(), act, kKeepDz ? kept_dz : nullptr);
  std::vector<Coef<A>> coef(a.C);
  for (int64_t c = 0; c < a.C; ++c) {
    coef[c] = finalize_grads(a, pg, c, sums[c], a.N * a.S);
  }
  if constexpr (kKeepDz) {
    short_planes_apply<T, KeptDzAct<T>, false, KeptDzFlags<F>>(
        over_kept_dz(a, kept_dz), coef.data(), KeptDzAct<T>(0.0));
  } else {
    short_planes_apply<T, Fn, kRes, F>(a, coef.data(), act);
  }
}

// The bits of bn_act_bwd's act_mask (checked by the op contract: empty, or what
// bn_act_fwd_train returns for this input and activation), or null where out gives the side
// (empty; or a layout or dtype whose kernel keeps no mask: then the forward returned zeros and
// out is read) or the activation reads no side.
const MaskWord* saved_mask_bits(const at::Tensor& act_mask) {
  return act_mask.numel() == 0 ? nullptr : act_mask.const_data_ptr<MaskWord>();
}

} // namespace

BwdOutputs bwd_cpu(
    const BwdOperands& in, const at::Tensor& act_mask, const OptTensor& weight,
    const OptTensor& bias, const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats,
    bool residual_grad) {
  constexpr const char* op = "bn_act_bwd";
  const View& g = in.g;
  const at::Tensor mask = act_mask.contiguous();
  const MaskWord* saved_mask = saved_mask_bits(mask);
  at::Tensor dx = empty_activation(g);
  at::Tensor dr = residual_grad ? empty_activation(g) : no_tensor(g);
  at::Tensor gw = empty_channel_stat(g);
  at::Tensor gb = empty_channel_stat(g);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_type<scalar_t>;
    const ParamGrads<scalar_t> pg{batch_stats, gw.mutable_data_ptr<A>(), gb.mutable_data_ptr<A>()};
    BwdBuffers<scalar_t> buf(
        in, weight, bias, mean, invstd, &dx, residual_grad ? &dr : nullptr, saved_mask);
    buf.args.stream = use_streaming_stores(bwd_bytes(in, residual_grad), Pass::kTwo);
    dispatch_dz<A>(in, [&](const auto& act, auto res_c) {
      using Fn = std::decay_t<decltype(act)>;
      constexpr bool kRes = decltype(res_c)::value;
      dispatch_bool(residual_grad, [&](auto res_grad_c) {
        constexpr bool kResGrad = decltype(res_grad_c)::value;
        auto run = [&](auto flags) {
          using F = decltype(flags);
          if (g.rows) {
            bwd_rows<scalar_t, Fn, kRes, F>(buf.args, pg, act);
          } else if (g.S < kShortPlane<scalar_t>) {
            bwd_short_planes<scalar_t, Fn, kRes, F>(buf.args, pg, act);
          } else {
            bwd_planes<scalar_t, Fn, kRes, F>(buf.args, pg, act);
          }
        };
        batch_stats ? run(BwdFlags<true, kResGrad>{}) : run(BwdFlags<false, kResGrad>{});
      });
    });
  });
  return {dx, dr, gw, gb};
}

} // namespace fused_resnet::cpu
