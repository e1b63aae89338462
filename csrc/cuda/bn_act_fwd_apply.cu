// Forward apply pass (bn_act_fwd_train after its statistics, and bn_act_fwd_eval):
//   y = act(x·scale + shift (+ r)),  scale = w·invstd,  shift = b − mean·scale,
// in the accumulation type, rounded once to the activation dtype. Training passes the batch
// mean and invstd just computed (batch_stats); eval passes the running statistics, folded here
// per channel (invstd = 1/sqrt(running_var + eps)) once per thread (rows) or per plane (planes).
// Memory traffic: reads x (and r), writes y, each once, in 16-byte accesses where aligned; the
// activation adds arithmetic only (at most one exp, erf or tanh per element).
//
// Instantiated per dtype (4) x activation (8) x residual (2) x (layout (2) x access width (2),
// and the flat path of skeletons.cuh): 320 kernels.
#include "activation.cuh"
#include "skeletons.cuh"
#include "static_switch.h"

namespace fused_resnet::cuda {

namespace {

template <typename T, Act kAct, bool kResidual>
struct FwdApplyOp {
  using A = acc_t<T>;
  static constexpr int kUnroll = 4;
  struct Coef {
    A scale, shift;
  };
  template <int L>
  struct Item {
    Pack<T, L> x;
    Pack<T, L> r;
  };

  FwdApplyArgs<T> a;

  __device__ __forceinline__ Coef coef(int64_t c) const {
    const A mean = load_channel<T>(a.mean, c, A(0));
    const A v = load_channel<T>(a.spread, c, A(1));
    const A invstd = a.batch_stats ? v : A(1) / ::sqrt(v + static_cast<A>(a.eps));
    const A scale = load_channel<T>(a.weight, c, A(1)) * invstd;
    return {scale, load_channel<T>(a.bias, c, A(0)) - mean * scale};
  }

  template <int L>
  __device__ __forceinline__ void load(Item<L>& it, int64_t off) const {
    it.x = load_pack<T, L>(a.x + off);
    if constexpr (kResidual) {
      it.r = load_pack<T, L>(a.r + off);
    }
  }

  template <int L, int LC>
  __device__ __forceinline__ void apply(const Coef (&k)[LC], const Item<L>& it, int64_t off) const {
    A y[L];
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const Coef& kj = k[LC == 1 ? 0 : j];
      A z = to_acc<A>(it.x.v[j]) * kj.scale + kj.shift;
      if constexpr (kResidual) {
        z += to_acc<A>(it.r.v[j]);
      }
      y[j] = activation<kAct>(z, a.negative_slope);
    }
    store_pack<T, L>(a.y + off, y);
  }
};

} // namespace

template <typename T>
void launch_fwd_apply(const ViewDims& dims, const FwdApplyArgs<T>& args, cudaStream_t stream) {
  dispatch_act(args.act, [&](auto act) {
    FR_BOOL_SWITCH(args.r != nullptr, kResidual, [&] {
      const FwdApplyOp<T, decltype(act)::value, kResidual> op{args};
      launch_apply<T>(op, dims, {args.x, args.r, args.y}, stream);
    });
  });
}

#define FR_INSTANTIATE(T) \
  template void launch_fwd_apply<T>(const ViewDims&, const FwdApplyArgs<T>&, cudaStream_t);
FR_FOR_EACH_DTYPE(FR_INSTANTIATE)
#undef FR_INSTANTIATE

} // namespace fused_resnet::cuda
