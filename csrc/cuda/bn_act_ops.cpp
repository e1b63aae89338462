// CUDA kernels of the fused_resnet ops (schemas and math in csrc/fused_resnet.cpp): the host
// side of a non-empty input, its arguments checked by the op contract (common/device_ops.h
// composes the registered ops). Allocates the outputs in the canonical input layout and launches
// on the current stream of the input's device. No host synchronization: every result stays on
// the device.
//
// Passes over the activations (tensor-sized reads + writes). dz = dy·act'(.) reads s tensors
// beside dy and x: s = 1, out (y), for relu, relu6 and leaky_relu; s = 1, the residual r, for
// silu, hardswish, gelu and gelu_tanh with a residual (z is recomputed from x and r); s = 0 for
// identity and the smooth activations without a residual.
//   bn_act_fwd_train   stats (x) + apply (x [, r] -> y)                          3 (4 with r)
//   bn_act_fwd_eval    apply (x [, r] -> y)                                      2 (3 with r)
//   bn_act_bwd         batch statistics: reduce (dy, s, x) + apply (dy, s, x -> dx)    5 + 2s
//                      with grad_residual: reduce (dy, s, x -> dr) + apply (dr, x -> dx) 6 + s
//                      running statistics: reduce (dy, s, x -> dx [, dr])   3 + s (4 + s with dr)
//   bn_stats, bn_act_bwd_reduce, bn_act_bwd_apply: the pieces above, for SyncBatchNorm.
// Every kernel is specialized on the activation (dispatch_act in the launchers, activation.cuh).
#include "bn_act_cuda.h"
#include "common/device_ops.h"
#include "common/contract.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace fused_resnet::cuda {

int multiprocessor_count() {
  static std::array<std::atomic<int>, 64> cache{};
  const int device = c10::cuda::current_device();
  if (device < static_cast<int>(cache.size())) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      return cached;
    }
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device < static_cast<int>(cache.size())) {
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

namespace {

ChannelVec channel_vec(const at::Tensor& t) {
  return {t.const_data_ptr(), t.stride(0), t.scalar_type() == at::kFloat};
}

ChannelVec channel_vec(const std::optional<at::Tensor>& t) {
  return given(t) ? channel_vec(*t) : ChannelVec{};
}

ViewDims dims_of(const View& g) {
  return {.N = g.N, .C = g.C, .S = g.S, .rows = g.rows};
}

// An activation output laid out like the canonical input (dense, so Preserve copies its strides).
at::Tensor empty_activation(const View& g) {
  return at::empty_like(g.x, at::MemoryFormat::Preserve);
}

// Workspace from the caching allocator, on the current stream of `like`'s device. The tensors are
// released when the op returns; the allocator reuses their memory only for work queued after
// the kernels on the same stream, so they stay valid for those kernels.
class TensorWorkspace final : public Workspace {
 public:
  explicit TensorWorkspace(const at::Tensor& like) : options_(like.options().dtype(at::kByte)) {}
  void* allocate(int64_t bytes) override {
    held_.push_back(at::empty({bytes}, options_));
    return held_.back().mutable_data_ptr();
  }

 private:
  at::TensorOptions options_;
  std::vector<at::Tensor> held_;
};

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_ptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.mutable_data_ptr<T>() : nullptr;
}

// The backward passes' common arguments, from the checked operands and the forward's vectors:
// out where the backward reads it, the residual where it recomputes z and one was given (the
// operands hold each only there: contract.h), bias for that recomputation.
template <typename T>
BwdInputs<T> bwd_inputs(
    const BwdOperands& in, const OptTensor& weight, const OptTensor& bias, const at::Tensor& mean,
    const at::Tensor& invstd) {
  return {
      .dy = in.grad_out.const_data_ptr<T>(),
      .y = ptr<T>(in.out),
      .x = in.g.x.const_data_ptr<T>(),
      .r = ptr<T>(in.residual),
      .weight = channel_vec(weight),
      .bias = channel_vec(bias),
      .mean = channel_vec(mean),
      .invstd = channel_vec(invstd),
      .act = in.act.kind,
      .negative_slope = static_cast<acc_t<T>>(in.act.negative_slope)};
}

} // namespace

namespace {

// The CUDA implementation of the ops on checked operands (kCudaOps below), from which
// common/device_ops.cpp composes the registered ops. The training forward's launches: the statistics (a memset of its counters and
// one reduce_kernel, whose per-channel finalize also updates `running`), then one apply_kernel.
TrainOutputs fwd_train_cuda(
    const FwdOperands& in, const OptTensor& weight, const OptTensor& bias, double eps,
    const RunningBuffers* running) {
  constexpr const char* op = "bn_act_fwd_train";
  const View& g = in.g;
  const at::Tensor& r = in.residual;
  const c10::cuda::CUDAGuard guard(g.x.device());

  at::Tensor out = empty_activation(g);
  at::Tensor mean = empty_channel_stat(g);
  at::Tensor invstd = empty_channel_stat(g);
  at::Tensor var = empty_channel_stat(g);
  // No act_mask is kept on the GPU: bn_act_bwd_cuda reads out (or recomputes z).
  at::Tensor act_mask = at::empty({0}, g.x.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const ViewDims dims = dims_of(g);
    const scalar_t* x = g.x.const_data_ptr<scalar_t>();
    const StatsArgs<scalar_t> stats{
        .x = x,
        .mean = mean.mutable_data_ptr<A>(),
        .var = var.mutable_data_ptr<A>(),
        .invstd = invstd.mutable_data_ptr<A>(),
        .eps = eps,
        .running = running_stats_update<A>(running, g.M())};
    TensorWorkspace workspace(g.x);
    launch_stats<scalar_t>(dims, stats, workspace, stream);
    const FwdApplyArgs<scalar_t> apply{
        .x = x,
        .r = ptr<scalar_t>(r),
        .y = out.mutable_data_ptr<scalar_t>(),
        .mean = channel_vec(mean),
        .spread = channel_vec(invstd),
        .batch_stats = true,
        .weight = channel_vec(weight),
        .bias = channel_vec(bias),
        .eps = eps,
        .act = in.act.kind,
        .negative_slope = static_cast<A>(in.act.negative_slope)};
    launch_fwd_apply<scalar_t>(dims, apply, stream);
  });
  return {out, mean, invstd, var, act_mask};
}

at::Tensor fwd_eval_cuda(
    const FwdOperands& in, const at::Tensor& running_mean, const at::Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, double eps) {
  constexpr const char* op = "bn_act_fwd_eval";
  const View& g = in.g;
  const at::Tensor& r = in.residual;
  const c10::cuda::CUDAGuard guard(g.x.device());

  at::Tensor out = empty_activation(g);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const FwdApplyArgs<scalar_t> apply{
        .x = g.x.const_data_ptr<scalar_t>(),
        .r = ptr<scalar_t>(r),
        .y = out.mutable_data_ptr<scalar_t>(),
        .mean = channel_vec(running_mean),
        .spread = channel_vec(running_var),
        .batch_stats = false,
        .weight = channel_vec(weight),
        .bias = channel_vec(bias),
        .eps = eps,
        .act = in.act.kind,
        .negative_slope = static_cast<A>(in.act.negative_slope)};
    launch_fwd_apply<scalar_t>(dims_of(g), apply, stream);
  });
  return out;
}

int64_t no_act_mask(const View&, bool /*keeps_mask*/) {
  return 0;  // fwd_train_cuda keeps no mask for any activation: bwd_cuda reads out
}

// act_mask is empty (no_act_mask): the side comes from out, or z is recomputed.
BwdOutputs bwd_cuda(
    const BwdOperands& in, const at::Tensor& /*act_mask*/, const OptTensor& weight,
    const OptTensor& bias, const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats,
    bool residual_grad) {
  constexpr const char* op = "bn_act_bwd";
  const View& g = in.g;
  const c10::cuda::CUDAGuard guard(g.x.device());

  at::Tensor dx = empty_activation(g);
  at::Tensor dr = residual_grad ? empty_activation(g) : no_tensor(g);
  at::Tensor gw = empty_channel_stat(g);
  at::Tensor gb = empty_channel_stat(g);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const ViewDims dims = dims_of(g);
    scalar_t* dr_ptr = mutable_ptr<scalar_t>(dr);
    // Running statistics: grad_input = w·invstd·dz needs no reduction, so the reduce pass
    // writes it. Batch statistics: the reduce pass stores dz into grad_residual (if wanted),
    // and the apply pass reads it back instead of forming it again from grad_out and out (or
    // z recomputed).
    const BwdInputs<scalar_t> inputs = bwd_inputs<scalar_t>(in, weight, bias, mean, invstd);
    const BwdReduceArgs<scalar_t> reduce{
        .in = inputs,
        .dr = dr_ptr,
        .dx = batch_stats ? nullptr : dx.mutable_data_ptr<scalar_t>(),
        .sum_dz_xhat = gw.mutable_data_ptr<A>(),
        .sum_dz = gb.mutable_data_ptr<A>()};
    TensorWorkspace workspace(g.x);
    launch_bwd_reduce<scalar_t>(dims, reduce, workspace, stream);
    if (batch_stats) {
      const BwdApplyArgs<scalar_t> apply{
          .in = inputs,
          .dz_in = dr_ptr,  // dz, where the reduce pass stored it
          .dx = dx.mutable_data_ptr<scalar_t>(),
          .sum_dz = channel_vec(gb),
          .sum_dz_xhat = channel_vec(gw),
          .inv_count = 1.0 / static_cast<double>(g.M())};
      launch_bwd_apply<scalar_t>(dims, apply, stream);
    }
  });
  return {dx, dr, gw, gb};
}

TensorPair stats_cuda(const View& g) {
  constexpr const char* op = "bn_stats";
  const c10::cuda::CUDAGuard guard(g.x.device());

  at::Tensor mean = empty_channel_stat(g);
  at::Tensor var = empty_channel_stat(g);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const StatsArgs<scalar_t> stats{
        .x = g.x.const_data_ptr<scalar_t>(),
        .mean = mean.mutable_data_ptr<A>(),
        .var = var.mutable_data_ptr<A>()};
    TensorWorkspace workspace(g.x);
    launch_stats<scalar_t>(dims_of(g), stats, workspace, stream);
  });
  return {mean, var};
}

TensorPair bwd_reduce_cuda(
    const BwdOperands& in, const OptTensor& weight, const OptTensor& bias, const at::Tensor& mean,
    const at::Tensor& invstd) {
  constexpr const char* op = "bn_act_bwd_reduce";
  const View& g = in.g;
  const c10::cuda::CUDAGuard guard(g.x.device());

  at::Tensor sum_dz_xhat = empty_channel_stat(g);
  at::Tensor sum_dz = empty_channel_stat(g);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const BwdReduceArgs<scalar_t> reduce{
        // no dx: weight and bias are read only to recompute z
        .in = bwd_inputs<scalar_t>(in, weight, bias, mean, invstd),
        .sum_dz_xhat = sum_dz_xhat.mutable_data_ptr<A>(),
        .sum_dz = sum_dz.mutable_data_ptr<A>()};
    TensorWorkspace workspace(g.x);
    launch_bwd_reduce<scalar_t>(dims_of(g), reduce, workspace, stream);
  });
  return {sum_dz_xhat, sum_dz};
}

TensorPair bwd_apply_cuda(
    const BwdOperands& in, const OptTensor& weight, const OptTensor& bias, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& mean_dz, const at::Tensor& mean_dz_xhat,
    bool residual_grad) {
  constexpr const char* op = "bn_act_bwd_apply";
  const View& g = in.g;
  const c10::cuda::CUDAGuard guard(g.x.device());

  at::Tensor dx = empty_activation(g);
  at::Tensor dr = residual_grad ? empty_activation(g) : no_tensor(g);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    const BwdApplyArgs<scalar_t> apply{
        .in = bwd_inputs<scalar_t>(in, weight, bias, mean, invstd),
        .dx = dx.mutable_data_ptr<scalar_t>(),
        .dr = mutable_ptr<scalar_t>(dr),
        .mean_dz = channel_vec(mean_dz),  // the given means
        .mean_dz_xhat = channel_vec(mean_dz_xhat)};
    launch_bwd_apply<scalar_t>(dims_of(g), apply, stream);
  });
  return {dx, dr};
}

const DeviceOps kCudaOps{
    .fwd_train = fwd_train_cuda,
    .fwd_eval = fwd_eval_cuda,
    .bwd = bwd_cuda,
    .stats = stats_cuda,
    .bwd_reduce = bwd_reduce_cuda,
    .bwd_apply = bwd_apply_cuda,
    .act_mask_bytes = no_act_mask,
};

} // namespace

} // namespace fused_resnet::cuda

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  fused_resnet::register_device_ops<fused_resnet::cuda::kCudaOps>(m);
}
