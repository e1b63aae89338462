// Backward reductions (bn_act_bwd, bn_act_bwd_reduce), dz = dy·act'(.):
//   sum_dz = Σdz (= grad_bias),  sum_dz_xhat = invstd·Σdz·(x − mean) (= grad_weight).
// dz from out for relu, relu6 and leaky_relu; from z = (x − mean)·(w·invstd) + b (+ r),
// recomputed here with the given statistics, for silu, hardswish, gelu and gelu_tanh; dy itself
// for identity (activation.cuh). One launch of reduce_kernel (plain sums per thread, then the
// fixed-order merges). Reads dy and x once, and y (piecewise-linear activations) or r (smooth
// ones, with a residual) once. The same pass optionally stores dz (grad_residual, which the apply
// pass then reads instead of recomputing it: one read fewer, and no second exp/erf/tanh) and,
// for running statistics, grad_input = w·invstd·dz, which needs no reduction, so that backward
// is a single pass.
//
// Instantiated per dtype (4) x (relu, relu6, leaky_relu, identity, and the four smooth
// activations with and without a residual: 12) x layout (2) x access width (2): 192 kernels.
#include "activation.cuh"
#include "skeletons.cuh"

namespace fused_resnet::cuda {

namespace {

template <typename T, Act kAct, bool kResidual>
struct BwdReduceOp {
  using A = acc_t<T>;
  static constexpr bool kReadsOut = backward_reads_out(kAct);
  static constexpr bool kRecomputesZ = backward_recomputes_z(kAct);
  static_assert(kRecomputesZ || !kResidual, "the residual is read only to recompute z");
  static constexpr int kUnroll = 2;
  template <int L>
  using State = Sums<A, L>;  // sum_dz = Σdz, sum_dz_xmu = Σdz·(x − mean)
  struct Ctx {
    A mean;
    A a;  // w·invstd: the grad_input factor of running statistics, and z's scale
    A b;  // z's shift (read where z is recomputed)
  };
  template <int L>
  struct Item {
    Pack<T, L> dy, y, x, r;  // y where kReadsOut, r where kResidual
  };

  BwdReduceArgs<T> a;

  __device__ __forceinline__ Ctx context(int64_t c) const {
    Ctx ctx{load_channel<T>(a.in.mean, c, A(0)),
            load_channel<T>(a.in.weight, c, A(1)) * load_channel<T>(a.in.invstd, c, A(1)), A(0)};
    if constexpr (kRecomputesZ) {
      ctx.b = load_channel<T>(a.in.bias, c, A(0));
    }
    return ctx;
  }

  template <int L>
  __device__ __forceinline__ void load(Item<L>& it, int64_t off) const {
    it.dy = load_pack<T, L>(a.in.dy + off);
    if constexpr (kReadsOut) {
      it.y = load_pack<T, L>(a.in.y + off);
    }
    it.x = load_pack<T, L>(a.in.x + off);
    if constexpr (kResidual) {
      it.r = load_pack<T, L>(a.in.r + off);
    }
  }

  template <int L>
  __device__ __forceinline__ void accumulate(State<L>& st, const Ctx (&ctx)[L], const Item<L>& it,
                                             int64_t off) const {
    A dz[L];
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const A xmu = to_acc<A>(it.x.v[j]) - ctx[j].mean;
      A y = A(0);
      A z = A(0);
      if constexpr (kReadsOut) {
        y = to_acc<A>(it.y.v[j]);
      }
      if constexpr (kRecomputesZ) {
        z = xmu * ctx[j].a + ctx[j].b;
        if constexpr (kResidual) {
          z += to_acc<A>(it.r.v[j]);
        }
      }
      dz[j] = activation_grad<kAct>(to_acc<A>(it.dy.v[j]), y, z, a.in.negative_slope);
      st.sum_dz[j] += dz[j];
      st.sum_dz_xmu[j] += dz[j] * xmu;
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
  dispatch_bwd_act(args.in.act, args.in.r != nullptr, [&](auto act, auto residual) {
    using Op = BwdReduceOp<T, decltype(act)::value, decltype(residual)::value>;
    const Op op{args};
    // only the activations the kernel reads decide the access width
    const T* y = Op::kReadsOut ? args.in.y : nullptr;
    const T* r = Op::kRecomputesZ ? args.in.r : nullptr;
    launch_for_view<T>(dims, {args.in.dy, y, args.in.x, r, args.dr, args.dx}, [&](auto lanes, auto rows) {
      run_reduce<T, decltype(lanes)::value, decltype(rows)::value>(op, dims, workspace, stream);
    });
  });
}

#define FR_INSTANTIATE(T)                                                                    \
  template void launch_bwd_reduce<T>(const ViewDims&, const BwdReduceArgs<T>&, Workspace&, \
                                     cudaStream_t);
FR_FOR_EACH_DTYPE(FR_INSTANTIATE)
#undef FR_INSTANTIATE

} // namespace fused_resnet::cuda
