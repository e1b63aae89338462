// SyncBatchNorm's pieces of the CPU backward: bn_act_bwd_reduce (the per-channel sums of this
// process's input) and bn_act_bwd_apply (dx, dr from the global means of those sums, after a
// collective), built from the reduce and apply passes of bn_act_bwd (bwd.cpp states the math:
// here B = −A·invstd·mean_dz_xhat, D = −A·mean_dz). Apart from bwd.cpp so that the build
// compiles the two in parallel: each is instantiated per dtype and activation.
#include "bwd_host.h"
#include "bwd_planes.h"
#include "bwd_rows.h"
#include "bwd_short_planes.h"

#include <ATen/Dispatch.h>

#include <vector>

namespace fused_resnet::cpu {

namespace {

template <typename T, typename Fn, bool kRes>
void bwd_reduce(
    const BwdArgs<T>& a, const View& g, acc_type<T>* sum_dz_xhat, acc_type<T>* sum_dz,
    const Fn& act) {
  using A = acc_type<T>;
  const int64_t threads = at::get_num_threads();
  std::vector<Sums> sums(a.C);
  if (g.rows) {
    const RowPlan plan(a.C, g.M(), VecT<T>::kStep, threads);
    rows_sums<T, Fn, kRes>(a, plan, repeated_params(a, plan), sums.data(), act);
  } else if (g.S < kShortPlane<T>) {  // as bn_act_bwd sums them
    short_planes_sums<T, Fn, kRes>(a, sums.data(), act);
  } else {
    planes_sums<T, Fn, kRes>(a, PlaneTasks(a.N, a.C, a.S, threads), sums.data(), act);
  }
  for (int64_t c = 0; c < a.C; ++c) {
    sum_dz_xhat[c] = sum_dz_xhat_of(sums[c], a.invstd[c]);
    sum_dz[c] = static_cast<A>(sums[c].sum_dz);
  }
}

template <typename T, typename Fn, bool kRes, typename F>
void bwd_apply(
    const BwdArgs<T>& a, const View& g, const acc_type<T>* mean_dz,
    const acc_type<T>* mean_dz_xhat, const Fn& act) {
  using A = acc_type<T>;
  const int64_t threads = at::get_num_threads();
  std::vector<Coef<A>> coef(a.C);
  for (int64_t c = 0; c < a.C; ++c) {
    coef[c] = batch_coef_of_means(a.w[c], a.invstd[c], mean_dz_xhat[c], mean_dz[c]);
  }
  if (g.rows) {
    const RowPlan plan(a.C, g.M(), VecT<T>::kStep, threads);
    rows_apply<T, Fn, kRes, F>(
        a, plan, RowCoefs<A>(coef, plan.W), repeated_params(a, plan), act);
  } else if (g.S < kShortPlane<T>) {
    short_planes_apply<T, Fn, kRes, F>(a, coef.data(), act);
  } else {
    planes_apply<T, Fn, kRes, F>(a, PlaneTasks(a.N, a.C, a.S, threads), coef.data(), act);
  }
}

} // namespace

TensorPair bwd_reduce_cpu(
    const BwdOperands& in, const OptTensor& weight, const OptTensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd) {
  constexpr const char* op = "bn_act_bwd_reduce";
  const View& g = in.g;
  at::Tensor sum_dz_xhat = empty_channel_stat(g);
  at::Tensor sum_dz = empty_channel_stat(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_type<scalar_t>;
    const BwdBuffers<scalar_t> buf(in, weight, bias, mean, invstd, nullptr, nullptr);
    dispatch_dz<A>(in, [&](const auto& act, auto res_c) {
      using Fn = std::decay_t<decltype(act)>;
      bwd_reduce<scalar_t, Fn, decltype(res_c)::value>(
          buf.args, g, sum_dz_xhat.mutable_data_ptr<A>(), sum_dz.mutable_data_ptr<A>(), act);
    });
  });
  return {sum_dz_xhat, sum_dz};
}

TensorPair bwd_apply_cpu(
    const BwdOperands& in, const OptTensor& weight, const OptTensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& mean_dz,
    const at::Tensor& mean_dz_xhat, bool residual_grad) {
  constexpr const char* op = "bn_act_bwd_apply";
  const View& g = in.g;
  at::Tensor dx = empty_activation(g);
  at::Tensor dr = residual_grad ? empty_activation(g) : no_tensor(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_type<scalar_t>;
    std::vector<A> mean_dz_acc(g.C), mean_dz_xhat_acc(g.C);
    read_param<A>(mean_dz, g.C, A(0), mean_dz_acc.data());
    read_param<A>(mean_dz_xhat, g.C, A(0), mean_dz_xhat_acc.data());
    BwdBuffers<scalar_t> buf(
        in, weight, bias, mean, invstd, &dx, residual_grad ? &dr : nullptr);
    // (one pass here, but the second of a training backward split around a collective)
    buf.args.stream = use_streaming_stores(bwd_bytes(in, residual_grad), Pass::kTwo);
    dispatch_dz<A>(in, [&](const auto& act, auto res_c) {
      using Fn = std::decay_t<decltype(act)>;
      dispatch_bool(residual_grad, [&](auto res_grad_c) {
        using F = BwdFlags<true, decltype(res_grad_c)::value>;
        bwd_apply<scalar_t, Fn, decltype(res_c)::value, F>(
            buf.args, g, mean_dz_acc.data(), mean_dz_xhat_acc.data(), act);
      });
    });
  });
  return {dx, dr};
}

} // namespace fused_resnet::cpu
