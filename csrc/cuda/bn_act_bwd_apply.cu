// Backward apply pass (bn_act_bwd with batch statistics, bn_act_bwd_apply):
//   grad_input = w·invstd·(dz − mean_dz − x̂·mean_dz_xhat),  x̂ = (x − mean)·invstd,
//   grad_residual = dz,
// written per channel as a·(dz − d − (x − mean)·k) with a = w·invstd, d = mean_dz and
// k = invstd·mean_dz_xhat. dz is read back from grad_residual when the reduce pass stored it
// there (reads dz, x; writes dx), else formed from dy and y (reads dy, y, x; writes dx and, if
// wanted, dr).
#include "skeletons.cuh"

namespace fused_resnet::cuda {

namespace {

template <typename T>
struct BwdApplyOp {
  using A = acc_t<T>;
  static constexpr int kUnroll = 2;
  struct Coef {
    A a, mean, d, k;
  };
  template <int L>
  struct Item {
    Pack<T, L> g;  // dz (from dz_in) or dy
    Pack<T, L> y;
    Pack<T, L> x;
  };

  BwdApplyArgs<T> a;

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
    return {load_channel<T>(a.in.weight, c, A(1)) * invstd, load_channel<T>(a.in.mean, c, A(0)),
            mean_dz, invstd * mean_dz_xhat};
  }

  template <int L>
  __device__ __forceinline__ void load(Item<L>& it, int64_t off) const {
    if (a.dz_in != nullptr) {
      it.g = load_pack<T, L>(a.dz_in + off);
    } else {
      it.g = load_pack<T, L>(a.in.dy + off);
      it.y = load_pack<T, L>(a.in.y + off);
    }
    it.x = load_pack<T, L>(a.in.x + off);
  }

  template <int L, int LC>
  __device__ __forceinline__ void apply(const Coef (&k)[LC], const Item<L>& it, int64_t off) const {
    A dz[L], dx[L];
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const Coef& kj = k[LC == 1 ? 0 : j];
      dz[j] = a.dz_in != nullptr ? to_acc<A>(it.g.v[j])
                                 : relu_grad(to_acc<A>(it.g.v[j]), to_acc<A>(it.y.v[j]));
      dx[j] = kj.a * (dz[j] - kj.d - (to_acc<A>(it.x.v[j]) - kj.mean) * kj.k);
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
  const BwdApplyOp<T> op{args};
  launch_for_view<T>(dims, {args.in.dy, args.in.y, args.dz_in, args.in.x, args.dx, args.dr}, [&](auto lanes, auto rows) {
    run_apply<T, decltype(lanes)::value, decltype(rows)::value>(op, dims, stream);
  });
}

#define FR_INSTANTIATE(T) \
  template void launch_bwd_apply<T>(const ViewDims&, const BwdApplyArgs<T>&, cudaStream_t);
FR_FOR_EACH_DTYPE(FR_INSTANTIATE)
#undef FR_INSTANTIATE

} // namespace fused_resnet::cuda
