// Backward apply pass (bn_act_bwd with batch statistics, bn_act_bwd_apply):
//   grad_input = w·invstd·(dz − mean_dz − x̂·mean_dz_xhat),  x̂ = (x − mean)·invstd,
//   grad_residual = dz,
// written per channel as a·(dz − d − (x − mean)·k) with a = w·invstd, d = mean_dz and
// k = invstd·mean_dz_xhat. dz is read back from grad_residual when the reduce pass stored it
// there (reads dz, x; writes dx), else formed as the reduce pass forms it (activation.cuh): from
// dy and y (relu, relu6, leaky_relu: reads dy, y, x), from dy and z = (x − mean)·a + b (+ r)
// recomputed (silu, hardswish, gelu, gelu_tanh: reads dy, x (, r)), or dy itself (identity:
// reads dy, x); writes dx and, if wanted, dr.
//
// A stored dz and the identity's dz = dy are the same kernel (dz read from one tensor), so this
// pass is instantiated per dtype (4) x (dz read, relu, relu6, leaky_relu, and the four smooth
// activations with and without a residual: 12) x (layout (2) x access width (2), and the flat
// path of skeletons.cuh): 240 kernels.
#include "activation.cuh"
#include "skeletons.cuh"

namespace fused_resnet::cuda {

namespace {

template <typename T, Act kAct, bool kResidual>
struct BwdApplyOp {
  using A = acc_t<T>;
  static constexpr bool kReadsOut = backward_reads_out(kAct);
  static constexpr bool kRecomputesZ = backward_recomputes_z(kAct);
  static_assert(kRecomputesZ || !kResidual, "the residual is read only to recompute z");
  static constexpr int kUnroll = 2;
  struct Coef {
    A a, mean, d, k;
    A b;  // z's shift (read where z is recomputed; z's scale is a)
  };
  template <int L>
  struct Item {
    Pack<T, L> g;  // dy, or dz (kIdentity: a stored dz, or the identity's dz = dy)
    Pack<T, L> y;  // where kReadsOut
    Pack<T, L> x;
    Pack<T, L> r;  // where kResidual
  };

  BwdApplyArgs<T> a;
  const T* g;  // what Item::g is loaded from: a.dz_in when given, else a.in.dy

  __device__ __forceinline__ Coef coef(int64_t c) const {
    const A invstd = load_channel<T>(a.in.invstd, c, A(1));
    A mean_dz, mean_dz_xhat;
    if (a.mean_dz.ptr != nullptr) {  // given means
      mean_dz = load_channel<T>(a.mean_dz, c, A(0));
      mean_dz_xhat = load_channel<T>(a.mean_dz_xhat, c, A(0));
    } else {  // this input's sums
      const A inv_count = static_cast<A>(a.inv_count);
      mean_dz = load_channel<T>(a.sum_dz, c, A(0)) * inv_count;
      mean_dz_xhat = load_channel<T>(a.sum_dz_xhat, c, A(0)) * inv_count;
    }
    Coef k{load_channel<T>(a.in.weight, c, A(1)) * invstd, load_channel<T>(a.in.mean, c, A(0)),
           mean_dz, invstd * mean_dz_xhat, A(0)};
    if constexpr (kRecomputesZ) {
      k.b = load_channel<T>(a.in.bias, c, A(0));
    }
    return k;
  }

  template <int L>
  __device__ __forceinline__ void load(Item<L>& it, int64_t off) const {
    it.g = load_pack<T, L>(g + off);
    if constexpr (kReadsOut) {
      it.y = load_pack<T, L>(a.in.y + off);
    }
    it.x = load_pack<T, L>(a.in.x + off);
    if constexpr (kResidual) {
      it.r = load_pack<T, L>(a.in.r + off);
    }
  }

  template <int L, int LC>
  __device__ __forceinline__ void apply(const Coef (&k)[LC], const Item<L>& it, int64_t off) const {
    A dz[L], dx[L];
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const Coef& kj = k[LC == 1 ? 0 : j];
      const A xmu = to_acc<A>(it.x.v[j]) - kj.mean;
      A y = A(0);
      A z = A(0);
      if constexpr (kReadsOut) {
        y = to_acc<A>(it.y.v[j]);
      }
      if constexpr (kRecomputesZ) {
        z = xmu * kj.a + kj.b;
        if constexpr (kResidual) {
          z += to_acc<A>(it.r.v[j]);
        }
      }
      dz[j] = activation_grad<kAct>(to_acc<A>(it.g.v[j]), y, z, a.in.negative_slope);
      dx[j] = kj.a * (dz[j] - kj.d - xmu * kj.k);
    }
    store_pack<T, L>(a.dx + off, dx);
    if (a.dr != nullptr) {
      store_pack<T, L>(a.dr + off, dz);
    }
  }
};

} // namespace

template <typename T>
void launch_bwd_apply(const ViewDims& dims, const BwdApplyArgs<T>& args, cudaStream_t stream) {
  // A stored dz is read as the identity's dz = dy is: the activation played its part already.
  const bool stored = args.dz_in != nullptr;
  const Act act = stored ? Act::kIdentity : args.in.act;
  const T* g = stored ? args.dz_in : args.in.dy;
  dispatch_bwd_act(act, !stored && args.in.r != nullptr, [&](auto kind, auto residual) {
    using Op = BwdApplyOp<T, decltype(kind)::value, decltype(residual)::value>;
    const Op op{args, g};
    // only the activations the kernel reads decide the access width
    const T* y = Op::kReadsOut ? args.in.y : nullptr;
    const T* r = Op::kRecomputesZ ? args.in.r : nullptr;
    launch_apply<T>(op, dims, {g, y, args.in.x, r, args.dx, args.dr}, stream);
  });
}

#define FR_INSTANTIATE(T) \
  template void launch_bwd_apply<T>(const ViewDims&, const BwdApplyArgs<T>&, cudaStream_t);
FR_FOR_EACH_DTYPE(FR_INSTANTIATE)
#undef FR_INSTANTIATE

} // namespace fused_resnet::cuda
