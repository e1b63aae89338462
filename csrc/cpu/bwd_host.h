// The host side of the CPU backward ops (bwd.cpp: bn_act_bwd; bwd_pieces.cpp: SyncBatchNorm's
// bn_act_bwd_reduce and bn_act_bwd_apply): their operands read into the kernels' arguments, the
// activation turned into the kernels' compile-time Fn, and the bytes a pass moves (for the
// streaming-store policy).
#pragma once

#include "act_math.h"
#include "bwd_spans.h"
#include "host.h"

#include <type_traits>
#include <vector>

namespace fused_resnet::cpu {

// weight, mean and invstd read into acc_t vectors, z's scale w·invstd and shift (the bias),
// and the pointers of the activations (out and the residual where the activation reads them:
// the op contract leaves the others undefined).
template <typename T>
struct BwdBuffers {
  std::vector<acc_type<T>> w, mean, invstd, zscale, zshift;
  BwdArgs<T> args;
  BwdBuffers(
      const BwdOperands& in, const OptTensor& weight, const OptTensor& bias,
      const at::Tensor& mean_t, const at::Tensor& invstd_t, at::Tensor* dx, at::Tensor* dr,
      const MaskWord* act_mask = nullptr)
      : w(in.g.C), mean(in.g.C), invstd(in.g.C), zscale(in.g.C), zshift(in.g.C) {
    using A = acc_type<T>;
    const int64_t C = in.g.C;
    read_param<A>(weight, C, A(1), w.data());
    read_param<A>(mean_t, C, A(0), mean.data());
    read_param<A>(invstd_t, C, A(1), invstd.data());
    read_param<A>(bias, C, A(0), zshift.data());
    for (int64_t c = 0; c < C; ++c) {
      zscale[c] = w[c] * invstd[c];  // the product the apply's coefficient A is (bwd_spans.h)
    }
    args.dy = in.grad_out.const_data_ptr<T>();
    args.y = in.out.defined() ? in.out.const_data_ptr<T>() : nullptr;
    args.x = in.g.x.const_data_ptr<T>();
    args.r = in.residual.defined() ? in.residual.const_data_ptr<T>() : nullptr;
    args.dx = dx != nullptr ? dx->mutable_data_ptr<T>() : nullptr;
    args.dr = dr != nullptr ? dr->mutable_data_ptr<T>() : nullptr;
    args.N = in.g.N;
    args.C = C;
    args.S = in.g.S;
    args.w = w.data();
    args.mean = mean.data();
    args.invstd = invstd.data();
    args.zscale = zscale.data();
    args.zshift = zshift.data();
    args.act_mask = act_mask;
    args.stream = false;  // the apply's callers decide (use_streaming_stores)
  }
};

// Calls f(act, res_c): the activation as its compile-time ActFn<kAct, A> (act_math.h), and
// whether a recomputed z adds the residual as std::bool_constant, true only for an activation
// that recomputes z and a residual given (the op contract passes none to the others).
template <typename A, typename F>
C10_ALWAYS_INLINE void dispatch_dz(const BwdOperands& in, const F& f) {
  dispatch_act(in.act.kind, [&](auto act_c) {
    using Fn = ActFn<decltype(act_c)::value, A>;
    const Fn act(in.act.negative_slope);
    if constexpr (Fn::kRecomputesZ) {
      if (in.residual.defined()) {
        f(act, std::true_type{});
        return;
      }
    }
    f(act, std::false_type{});
  });
}

// Bytes of activations a backward pass touches: dy, x, and out or the residual where the
// activation reads them, read; dx, and dr when residual_grad, written.
inline int64_t bwd_bytes(const BwdOperands& in, bool residual_grad) {
  const int64_t operands = 3 + (in.out.defined() || in.residual.defined() ? 1 : 0) +
      (residual_grad ? 1 : 0);
  return in.g.numel() * static_cast<int64_t>(in.g.x.element_size()) * operands;
}

} // namespace fused_resnet::cpu
