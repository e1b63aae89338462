// Training-forward statistics (bn_act_fwd_train, bn_stats): per channel, over its M = N·S
// elements, mean and biased variance = M2 / M, and invstd = 1/sqrt(var + eps); bn_act's
// running-statistics update in the same per-channel finalize (common/running_stats.h).
//
// One launch of reduce_kernel: Moments per thread by Welford's update (one division per access,
// shared by its lanes), Chan merges across the warp, the block and the blocks of a channel.
// Reads x once (N·C·S elements); writes O(C · blocks per channel) partials.
#include "skeletons.cuh"

#include <cmath>

namespace fused_resnet::cuda {

namespace {

template <typename T>
struct StatsOp {
  using A = acc_t<T>;
  static constexpr int kUnroll = 4;
  template <int L>
  using State = Moments<A, L>;
  struct Ctx {};
  template <int L>
  struct Item {
    Pack<T, L> x;
  };

  StatsArgs<T> a;

  __device__ __forceinline__ Ctx context(int64_t) const {
    return {};
  }

  template <int L>
  __device__ __forceinline__ void load(Item<L>& it, int64_t off) const {
    it.x = load_pack<T, L>(a.x + off);
  }

  template <int L>
  __device__ __forceinline__ void accumulate(State<L>& st, const Ctx (&)[L], const Item<L>& it,
                                             int64_t) const {
    A x[L];
#pragma unroll
    for (int j = 0; j < L; ++j) {
      x[j] = to_acc<A>(it.x.v[j]);
    }
    st.push(x);
  }

  // n = M > 0 for every channel (empty inputs never launch). Runs once per channel, in the
  // last block of the channel's group, after every partial is merged.
  __device__ __forceinline__ void finalize(int64_t c, const State<1>& s) const {
    const A var = s.m2[0] / static_cast<A>(s.n);
    a.mean[c] = s.mean[0];
    a.var[c] = var;
    if (a.invstd != nullptr) {
      // in double, rounded once (as the CPU backend and aten's batch_norm)
      a.invstd[c] = static_cast<A>(1.0 / ::sqrt(static_cast<double>(var) + a.eps));
    }
    a.running.template apply<T>(c, s.mean[0], var);
  }
};

} // namespace

template <typename T>
void launch_stats(const ViewDims& dims, const StatsArgs<T>& args, Workspace& workspace,
                  cudaStream_t stream) {
  const StatsOp<T> op{args};
  launch_for_view<T>(dims, {args.x}, [&](auto lanes, auto rows) {
    run_reduce<T, decltype(lanes)::value, decltype(rows)::value>(op, dims, workspace, stream);
  });
}

#define FR_INSTANTIATE(T) \
  template void launch_stats<T>(const ViewDims&, const StatsArgs<T>&, Workspace&, cudaStream_t);
FR_FOR_EACH_DTYPE(FR_INSTANTIATE)
#undef FR_INSTANTIATE

} // namespace fused_resnet::cuda
