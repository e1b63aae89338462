// Interface between the host ops of the CUDA backend (bn_act_ops.cpp) and the kernel launchers
// (bn_act_stats.cu, bn_act_fwd_apply.cu, bn_act_bwd_reduce.cu, bn_act_bwd_apply.cu). The math of
// every op is stated in csrc/fused_resnet.cpp.
//
// Every activation is addressed as a matrix [outer][inner] with one linear index:
//   planes  [N][C][S]  (contiguous NC*, S > 1): row n*C + c is the plane of channel c in sample n
//   rows    [N*S][C]   (channels_last, or S == 1): column c is channel c
// (csrc/common/contract.h picks the layout and brings every activation to it.)
#pragma once

#include "common/activation.h"
#include "common/running_stats.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fused_resnet::cuda {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
// Accumulation type: double for double, float for float, half and bfloat16.
template <typename T>
using acc_t = typename AccType<T>::type;

// A per-channel vector in global memory: element c at ptr[c * stride], stored in the input's
// dtype or in float32 (the op contract allows exactly these). A null ptr means "absent" (weight or
// bias not given) and reads as the caller's fill value.
struct ChannelVec {
  const void* ptr = nullptr;
  int64_t stride = 1;
  bool is_float = false;
};

// View's dimensions without the tensor, for the kernels: the fields of View
// (csrc/common/contract.h), in its order, N, C, S and the layout `rows`.
struct ViewDims {
  int64_t N, C, S;
  bool rows;  // true: [N*S][C] rows of C; false: [N][C][S] planes of S
  int64_t numel() const { return N * C * S; }
};

// Training-forward statistics (bn_act_fwd_train, bn_stats): mean and biased variance per channel
// (Moments per thread, Chan merges), and invstd = 1/sqrt(var + eps) when invstd is not null. The
// per-channel finalize also applies `running` (bn_act: the running statistics' update).
//
// The argument structs are filled by name (designated initializers, in declaration order);
// a pointer left out is null, which each field's comment says how the kernels read.
template <typename T>
struct StatsArgs {
  const T* x = nullptr;
  acc_t<T>* mean = nullptr;
  acc_t<T>* var = nullptr;
  acc_t<T>* invstd = nullptr;  // null: not wanted (bn_stats)
  double eps = 0.0;
  RunningStatsUpdate<acc_t<T>> running{};  // default: nothing to update
};

// y = act(x * scale + shift (+ r)), scale = w * invstd, shift = b - mean * scale, where invstd is
// given (batch_stats: the batch statistics just computed) or 1/sqrt(var + eps) (not batch_stats:
// the running statistics, eval). The kernel is specialized on act (activation.cuh).
template <typename T>
struct FwdApplyArgs {
  const T* x = nullptr;
  const T* r = nullptr;  // null: no residual
  T* y = nullptr;
  ChannelVec mean{};
  ChannelVec spread{};      // batch_stats: the batch invstd; else the running variance
  bool batch_stats = true;  // false: spread is the variance, invstd = 1/sqrt(spread + eps)
  ChannelVec weight{};      // absent: 1
  ChannelVec bias{};        // absent: 0
  double eps = 0.0;
  Act act = Act::kRelu;
  acc_t<T> negative_slope = acc_t<T>(0.01);  // read by leaky_relu only
};

// What both backward passes read: grad_out (dy), the forward's input (x), the per-channel vectors
// of the forward's normalization, and what dz = dy·act'(.) needs beside dy: the forward's out (y)
// where the activation's backward reads it (backward_reads_out: relu, relu6, leaky_relu), or,
// where it recomputes z = (x − mean)·invstd·w + b (+ r) (backward_recomputes_z: silu, hardswish,
// gelu, gelu_tanh), the bias and the residual; bn_act_ops.cpp fills it once per op. The kernels
// are specialized on act (activation.cuh) and read only what it needs.
template <typename T>
struct BwdInputs {
  const T* dy = nullptr;
  const T* y = nullptr;  // null where the backward does not read out
  const T* x = nullptr;
  const T* r = nullptr;  // null: no residual in z (or z not recomputed)
  ChannelVec weight{};   // absent: 1
  ChannelVec bias{};     // absent: 0; read only to recompute z
  ChannelVec mean{};
  ChannelVec invstd{};
  Act act = Act::kRelu;
  acc_t<T> negative_slope = acc_t<T>(0.01);  // read by leaky_relu only
};

// Backward reductions, dz = dy·act'(.) (from y, or z recomputed, or dy itself: identity):
//   sum_dz = Σdz,  sum_dz_xhat = Σdz·x̂ = invstd·Σdz·(x − mean)   (this input's sums, not means).
// The same pass may also store dz (dr: grad_residual, or the apply pass's input) and, when the
// statistics are not batch statistics, grad_input = w·invstd·dz (dx), which needs no reduction.
template <typename T>
struct BwdReduceArgs {
  BwdInputs<T> in;
  T* dr = nullptr;  // null: dz not stored
  T* dx = nullptr;  // null: grad_input left to the apply pass
  acc_t<T>* sum_dz_xhat = nullptr;
  acc_t<T>* sum_dz = nullptr;
};

// grad_input = w·invstd·(dz − mean_dz − x̂·mean_dz_xhat), x̂ = (x − mean)·invstd, with the means
// given (mean_dz = Σdz/M_total, mean_dz_xhat = Σdz·x̂/M_total: bn_act_bwd_apply) or, where
// mean_dz is absent, formed from this input's sums: mean_dz = sum_dz·inv_count and
// mean_dz_xhat = sum_dz_xhat·inv_count, inv_count = 1/M (bn_act_bwd). dz is read from dz_in when
// given (stored there by the reduce pass; in.act then plays no part), else formed as the reduce
// pass forms it, and then stored to dr when dr is not null.
template <typename T>
struct BwdApplyArgs {
  BwdInputs<T> in;
  const T* dz_in = nullptr;  // null: dz from in.dy and in.y, or z recomputed
  T* dx = nullptr;
  T* dr = nullptr;  // null: grad_residual not wanted (or already stored)
  ChannelVec mean_dz{};       // absent: the means from sum_dz, sum_dz_xhat and inv_count
  ChannelVec mean_dz_xhat{};  // (given and absent together)
  ChannelVec sum_dz{};        // Σdz
  ChannelVec sum_dz_xhat{};   // Σdz·x̂
  double inv_count = 1.0;     // 1/M
};

// Device memory for a launcher's temporaries (the reductions' staging buffer and counters),
// supplied by the host op from PyTorch's caching allocator: valid for all work queued on the
// launch stream. (The kernel files do not include ATen, which would triple their compile time.)
class Workspace {
 public:
  virtual void* allocate(int64_t bytes) = 0;

 protected:
  ~Workspace() = default;
};

// Calls M(T) for every activation dtype the launchers are instantiated for.
#define FR_FOR_EACH_DTYPE(M) M(float) M(double) M(c10::Half) M(c10::BFloat16)

// Launchers (explicitly instantiated for float, double, c10::Half, c10::BFloat16). Each launches
// on `stream` and checks the launch; none synchronizes. Preconditions (checked by the host ops):
// numel > 0 (so N*S > 0 and C > 0), every activation dense in the layout's order, and the
// stream's device current.
template <typename T>
void launch_stats(const ViewDims& dims, const StatsArgs<T>& args, Workspace& workspace,
                  cudaStream_t stream);
template <typename T>
void launch_fwd_apply(const ViewDims& dims, const FwdApplyArgs<T>& args, cudaStream_t stream);
template <typename T>
void launch_bwd_reduce(const ViewDims& dims, const BwdReduceArgs<T>& args, Workspace& workspace,
                       cudaStream_t stream);
template <typename T>
void launch_bwd_apply(const ViewDims& dims, const BwdApplyArgs<T>& args, cudaStream_t stream);

// Number of multiprocessors of the current device (cached per device).
int multiprocessor_count();

} // namespace fused_resnet::cuda
