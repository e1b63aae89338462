// Backward reductions (bn_act_bwd, bn_act_bwd_reduce), dz = 0 where out <= 0 else grad_out:
//   sum_dz = Σdz (= grad_bias),  sum_dz_xhat = invstd·Σdz·(x − mean) (= grad_weight).
// One launch of reduce_kernel (plain sums per thread, then the fixed-order merges). Reads dy, y
// and x once. The same pass optionally stores dz (grad_residual, which the apply pass then reads
// instead of dy and y: one read fewer) and, for running statistics, grad_input = w·invstd·dz,
// which needs no reduction, so that backward is a single pass.
#include "skeletons.cuh"

namespace fused_resnet::cuda {

namespace {

template <typename T>
struct BwdReduceOp {
  using A = acc_t<T>;
  static constexpr int kUnroll = 2;
  template <int L>
  using State = Sums<A, L>;  // sum_dz = Σdz, sum_dz_xmu = Σdz·(x − mean)
  struct Ctx {
    A mean, a;  // a = w·invstd, the grad_input factor of running statistics
  };
  template <int L>
  struct Item {
    Pack<T, L> dy, y, x;
  };

  BwdReduceArgs<T> a;

  __device__ __forceinline__ Ctx context(int64_t c) const {
    return {load_channel<T>(a.in.mean, c, A(0)),
            load_channel<T>(a.in.weight, c, A(1)) * load_channel<T>(a.in.invstd, c, A(1))};
  }

  template <int L>
  __device__ __forceinline__ void load(Item<L>& it, int64_t off) const {
    it.dy = load_pack<T, L>(a.in.dy + off);
    it.y = load_pack<T, L>(a.in.y + off);
    it.x = load_pack<T, L>(a.in.x + off);
  }

  template <int L>
  __device__ __forceinline__ void accumulate(State<L>& st, const Ctx (&ctx)[L], const Item<L>& it,
                                             int64_t off) const {
    A dz[L];
#pragma unroll
    for (int j = 0; j < L; ++j) {
      dz[j] = relu_grad(to_acc<A>(it.dy.v[j]), to_acc<A>(it.y.v[j]));
      st.sum_dz[j] += dz[j];
      st.sum_dz_xmu[j] += dz[j] * (to_acc<A>(it.x.v[j]) - ctx[j].mean);
    }
    if (a.dr != nullptr) {
      store_pack<T, L>(a.dr + off, dz);
    }
    if (a.dx != nullptr) {
      A dx[L];
#pragma unroll
      for (int j = 0; j < L; ++j) {
        dx[j] = ctx[j].a * dz[j];
      }
      store_pack<T, L>(a.dx + off, dx);
    }
  }

  __device__ __forceinline__ void finalize(int64_t c, const State<1>& s) const {
    a.sum_dz[c] = s.sum_dz[0];
    a.sum_dz_xhat[c] = s.sum_dz_xmu[0] * load_channel<T>(a.in.invstd, c, A(1));  // Σdz·x̂
  }
};

} // namespace

template <typename T>
void launch_bwd_reduce(const ViewDims& dims, const BwdReduceArgs<T>& args, Workspace& workspace,
                       cudaStream_t stream) {
  const BwdReduceOp<T> op{args};
  launch_for_view<T>(dims, {args.in.dy, args.in.y, args.in.x, args.dr, args.dx}, [&](auto lanes, auto rows) {
    run_reduce<T, decltype(lanes)::value, decltype(rows)::value>(op, dims, workspace, stream);
  });
}

#define FR_INSTANTIATE(T)                                                                    \
  template void launch_bwd_reduce<T>(const ViewDims&, const BwdReduceArgs<T>&, Workspace&, \
                                     cudaStream_t);
FR_FOR_EACH_DTYPE(FR_INSTANTIATE)
#undef FR_INSTANTIATE

} // namespace fused_resnet::cuda
