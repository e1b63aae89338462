// CUDA kernels of the fused_resnet ops (schemas and math in csrc/fused_resnet.cpp): the host
// side. Checks the inputs (the op contract, csrc/common/contract.h, shared with the CPU backend), allocates
// the outputs in the canonical input layout, and launches on the current stream of the input's
// device. No host synchronization: every result stays on the device.
//
// Passes over the activations (tensor-sized reads + writes):
//   bn_act_fwd_train   stats (x) + apply (x [, r] -> y)                          3 (4 with r)
//   bn_act_fwd_eval    apply (x [, r] -> y)                                      2 (3 with r)
//   bn_act_bwd         batch statistics: reduce (dy, y, x) + apply (dy, y, x -> dx)         7
//                      with grad_residual: reduce (dy, y, x -> dr) + apply (dr, x -> dx)    7
//                      running statistics: reduce (dy, y, x -> dx [, dr])       4 (5 with dr)
//   bn_stats, bn_act_bwd_reduce, bn_act_bwd_apply: the pieces above, for SyncBatchNorm.
#include "bn_act_cuda.h"
#include "common/bn_act_module.h"
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

Layout layout_of(const Geometry& g) {
  return {g.N, g.C, g.S, g.rows};
}

// An activation output laid out like the canonical input (dense, so Preserve copies its strides).
at::Tensor empty_activation(const Geometry& g) {
  return at::empty_like(g.x, at::MemoryFormat::Preserve);
}

at::Tensor empty_channel_stat(const Geometry& g) {
  return at::empty({g.C}, g.x.options().dtype(acc_dtype(g.x.scalar_type())));
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

} // namespace

namespace {

// The CUDA forwards on checked operands, from which common/bn_act_module.cpp composes bn_act,
// bn_act_fwd_train and bn_act_fwd_eval. Launches: the statistics (a memset of its counters and
// one reduce_kernel, whose per-channel finalize also updates `running`), then one apply_kernel.
TrainOutputs fwd_train_cuda(
    const FwdOperands& in, const OptTensor& weight, const OptTensor& bias, double eps,
    const RunningBuffers* running) {
  constexpr const char* op = "bn_act_fwd_train";
  const Geometry& g = in.g;
  const at::Tensor& input = g.x;
  const at::Tensor& r = in.residual;
  const c10::cuda::CUDAGuard guard(input.device());

  at::Tensor out = empty_activation(g);
  at::Tensor mean = empty_channel_stat(g);
  at::Tensor invstd = empty_channel_stat(g);
  at::Tensor var = empty_channel_stat(g);
  // No ReLU mask is kept on the GPU yet: bn_act_bwd_cuda reads out.
  at::Tensor relu_mask = at::empty({0}, input.options().dtype(at::kByte));
  if (g.M() == 0) {
    // empty batch: mean 0, var 0, invstd 1/sqrt(eps); out is empty
    mean.zero_();
    var.zero_();
    invstd.fill_(1.0 / std::sqrt(eps));
    return {out, mean, invstd, var, relu_mask};
  }
  if (g.C == 0) {
    return {out, mean, invstd, var, relu_mask};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const Layout layout = layout_of(g);
    const scalar_t* x = g.x.const_data_ptr<scalar_t>();
    StatsArgs<scalar_t> stats{
        .x = x,
        .mean = mean.mutable_data_ptr<A>(),
        .var = var.mutable_data_ptr<A>(),
        .invstd = invstd.mutable_data_ptr<A>(),
        .eps = eps,
        .running = running_stats_update<A>(running, g.M())};
    TensorWorkspace workspace(g.x);
    launch_stats<scalar_t>(layout, stats, workspace, stream);
    FwdApplyArgs<scalar_t> apply{
        x, ptr<scalar_t>(r), out.mutable_data_ptr<scalar_t>(), channel_vec(mean),
        channel_vec(invstd), /*is_invstd=*/true, channel_vec(weight), channel_vec(bias), eps};
    launch_fwd_apply<scalar_t>(layout, apply, stream);
  });
  return {out, mean, invstd, var, relu_mask};
}

at::Tensor fwd_eval_cuda(
    const FwdOperands& in, const at::Tensor& running_mean, const at::Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, double eps) {
  constexpr const char* op = "bn_act_fwd_eval";
  const Geometry& g = in.g;
  const at::Tensor& input = g.x;
  const at::Tensor& r = in.residual;
  const c10::cuda::CUDAGuard guard(input.device());

  at::Tensor out = empty_activation(g);
  if (g.numel() == 0) {
    return out;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    FwdApplyArgs<scalar_t> apply{
        g.x.const_data_ptr<scalar_t>(), ptr<scalar_t>(r), out.mutable_data_ptr<scalar_t>(),
        channel_vec(running_mean), channel_vec(running_var), /*is_invstd=*/false,
        channel_vec(weight), channel_vec(bias), eps};
    launch_fwd_apply<scalar_t>(layout_of(g), apply, stream);
  });
  return out;
}

const BnActDevice kCudaForwards{fwd_train_cuda, fwd_eval_cuda};

int64_t no_relu_mask(const Geometry&) {
  return 0;  // bn_act_fwd_train_cuda keeps no ReLU mask: bn_act_bwd_cuda reads out
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_cuda(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool training, double momentum, double eps) {
  return bn_act(
      input, residual, weight, bias, running_mean, running_var, training, momentum, eps,
      kCudaForwards);
}

TrainOutputs bn_act_fwd_train_cuda(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, double eps) {
  return bn_act_fwd_train(input, residual, weight, bias, eps, kCudaForwards);
}

at::Tensor bn_act_fwd_eval_cuda(
    const at::Tensor& input, const OptTensor& residual, const at::Tensor& running_mean,
    const at::Tensor& running_var, const OptTensor& weight, const OptTensor& bias, double eps) {
  return bn_act_fwd_eval(
      input, residual, running_mean, running_var, weight, bias, eps, kCudaForwards);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_cuda(
    const at::Tensor& grad_out,
    const at::Tensor& out,
    const at::Tensor& relu_mask,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    bool batch_stats,
    bool residual_grad) {
  constexpr const char* op = "bn_act_bwd";
  const BwdOperands in =
      bwd_operands(grad_out, out, relu_mask, input, weight, mean, invstd, no_relu_mask);
  const Geometry& g = in.g;
  const at::Tensor& dy = in.grad_out;
  const at::Tensor& y = in.out;
  const c10::cuda::CUDAGuard guard(input.device());

  at::Tensor dx = empty_activation(g);
  at::Tensor dr = residual_grad ? empty_activation(g) : at::empty({0}, input.options());
  at::Tensor gw = empty_channel_stat(g);
  at::Tensor gb = empty_channel_stat(g);
  if (g.numel() == 0) {
    gw.zero_();
    gb.zero_();
    return {dx, dr, gw, gb};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    const Layout layout = layout_of(g);
    scalar_t* dr_ptr = mutable_ptr<scalar_t>(dr);
    // Running statistics: grad_input = w·invstd·dz needs no reduction, so the reduce pass
    // writes it. Batch statistics: the reduce pass stores dz into grad_residual (if wanted),
    // and the apply pass reads it back instead of grad_out and out.
    BwdReduceArgs<scalar_t> reduce{
        dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
        g.x.const_data_ptr<scalar_t>(), dr_ptr,
        batch_stats ? nullptr : dx.mutable_data_ptr<scalar_t>(), channel_vec(weight),
        channel_vec(mean), channel_vec(invstd), gw.mutable_data_ptr<A>(),
        gb.mutable_data_ptr<A>()};
    TensorWorkspace workspace(g.x);
    launch_bwd_reduce<scalar_t>(layout, reduce, workspace, stream);
    if (batch_stats) {
      BwdApplyArgs<scalar_t> apply{
          dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), dr_ptr,
          g.x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), /*dr=*/nullptr,
          channel_vec(weight), channel_vec(mean), channel_vec(invstd), channel_vec(gb),
          channel_vec(gw), 1.0 / static_cast<double>(g.M())};
      launch_bwd_apply<scalar_t>(layout, apply, stream);
    }
  });
  return {dx, dr, gw, gb};
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& input) {
  constexpr const char* op = "bn_stats";
  const Geometry g = stats_operands(input);
  const c10::cuda::CUDAGuard guard(input.device());

  at::Tensor mean = empty_channel_stat(g);
  at::Tensor var = empty_channel_stat(g);
  if (g.numel() == 0) {
    mean.zero_();
    var.zero_();
    return {mean, var};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    StatsArgs<scalar_t> stats{
        g.x.const_data_ptr<scalar_t>(), mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>(),
        /*invstd=*/nullptr, /*eps=*/0.0};
    TensorWorkspace workspace(g.x);
    launch_stats<scalar_t>(layout_of(g), stats, workspace, stream);
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> bn_act_bwd_reduce_cuda(
    const at::Tensor& grad_out,
    const at::Tensor& out,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& invstd) {
  constexpr const char* op = "bn_act_bwd_reduce";
  const BwdOperands in = bwd_reduce_operands(grad_out, out, input, mean, invstd);
  const Geometry& g = in.g;
  const at::Tensor& dy = in.grad_out;
  const at::Tensor& y = in.out;
  const c10::cuda::CUDAGuard guard(input.device());

  at::Tensor sum_dz_xhat = empty_channel_stat(g);
  at::Tensor sum_dz = empty_channel_stat(g);
  if (g.numel() == 0) {
    sum_dz_xhat.zero_();
    sum_dz.zero_();
    return {sum_dz_xhat, sum_dz};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_t<scalar_t>;
    BwdReduceArgs<scalar_t> reduce{
        dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
        g.x.const_data_ptr<scalar_t>(), /*dr=*/nullptr, /*dx=*/nullptr, /*weight=*/ChannelVec{},
        channel_vec(mean), channel_vec(invstd), sum_dz_xhat.mutable_data_ptr<A>(),
        sum_dz.mutable_data_ptr<A>()};
    TensorWorkspace workspace(g.x);
    launch_bwd_reduce<scalar_t>(layout_of(g), reduce, workspace, stream);
  });
  return {sum_dz_xhat, sum_dz};
}

std::tuple<at::Tensor, at::Tensor> bn_act_bwd_apply_cuda(
    const at::Tensor& grad_out,
    const at::Tensor& out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& mean_dz,
    const at::Tensor& mean_dz_xhat,
    bool residual_grad) {
  constexpr const char* op = "bn_act_bwd_apply";
  const BwdOperands in = bwd_apply_operands(
      grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat);
  const Geometry& g = in.g;
  const at::Tensor& dy = in.grad_out;
  const at::Tensor& y = in.out;
  const c10::cuda::CUDAGuard guard(input.device());

  at::Tensor dx = empty_activation(g);
  at::Tensor dr = residual_grad ? empty_activation(g) : at::empty({0}, input.options());
  if (g.numel() == 0) {
    return {dx, dr};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    BwdApplyArgs<scalar_t> apply{
        dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), /*dz_in=*/nullptr,
        g.x.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(),
        mutable_ptr<scalar_t>(dr), channel_vec(weight), channel_vec(mean), channel_vec(invstd),
        channel_vec(mean_dz), channel_vec(mean_dz_xhat), /*inv_count=*/1.0};
    launch_bwd_apply<scalar_t>(layout_of(g), apply, stream);
  });
  return {dx, dr};
}

} // namespace fused_resnet::cuda

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("bn_act", TORCH_FN(fused_resnet::cuda::bn_act_cuda));
  m.impl("bn_act_fwd_train", TORCH_FN(fused_resnet::cuda::bn_act_fwd_train_cuda));
  m.impl("bn_act_fwd_eval", TORCH_FN(fused_resnet::cuda::bn_act_fwd_eval_cuda));
  m.impl("bn_act_bwd", TORCH_FN(fused_resnet::cuda::bn_act_bwd_cuda));
  m.impl("bn_stats", TORCH_FN(fused_resnet::cuda::bn_stats_cuda));
  m.impl("bn_act_bwd_reduce", TORCH_FN(fused_resnet::cuda::bn_act_bwd_reduce_cuda));
  m.impl("bn_act_bwd_apply", TORCH_FN(fused_resnet::cuda::bn_act_bwd_apply_cuda));
}
