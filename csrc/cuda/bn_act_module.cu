// bn_act on CUDA: the training / eval forwards of bn_act_ops.cpp, and the running-statistics
// update as one launch of a C-thread kernel on the current stream (no host synchronization):
//   running[c] <- (1 - momentum) * running[c] + momentum * scale * batch[c]
// for the mean (scale 1) and the variance (scale M/(M-1)), in the acc dtype of the batch
// statistics, stored in the running buffers' dtype. Reads and writes 4·C values.
#include "bn_act_cuda.h"
#include "common/bn_act_module.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace fused_resnet::cuda {

// The forwards (bn_act_ops.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_fwd_train_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps);
at::Tensor bn_act_fwd_eval_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const at::Tensor& running_mean, const at::Tensor& running_var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps);

namespace {

template <typename B, typename A>
__global__ void update_running_stats_kernel(
    B* running_mean, int64_t mean_stride, B* running_var, int64_t var_stride,
    const A* batch_mean, const A* batch_var, int64_t C, A keep, A take_mean, A take_var) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c < C) {
    B& m = running_mean[c * mean_stride];
    B& v = running_var[c * var_stride];
    m = static_cast<B>(static_cast<A>(m) * keep + batch_mean[c] * take_mean);
    v = static_cast<B>(static_cast<A>(v) * keep + batch_var[c] * take_var);
  }
}

template <typename A>
void launch_update(
    const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, double momentum, double unbias) {
  const int64_t C = running_mean.size(0);
  if (C == 0) {
    return;
  }
  TORCH_CHECK(
      running_mean.scalar_type() == running_var.scalar_type(),
      "bn_act: running_mean and running_var must have the same dtype, got ",
      running_mean.scalar_type(), " and ", running_var.scalar_type());
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>((C + kThreads - 1) / kThreads);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, running_mean.scalar_type(), "fused_resnet_running_stats", [&] {
        update_running_stats_kernel<scalar_t, A><<<blocks, kThreads, 0, stream>>>(
            running_mean.mutable_data_ptr<scalar_t>(), running_mean.stride(0),
            running_var.mutable_data_ptr<scalar_t>(), running_var.stride(0),
            batch_mean.const_data_ptr<A>(), batch_var.const_data_ptr<A>(), C,
            static_cast<A>(1.0 - momentum), static_cast<A>(momentum),
            static_cast<A>(momentum * unbias));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void update_running_stats_cuda(
    const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, double momentum, double unbias) {
  const c10::cuda::CUDAGuard guard(running_mean.device());
  if (batch_mean.scalar_type() == at::kDouble) {
    launch_update<double>(running_mean, running_var, batch_mean, batch_var, momentum, unbias);
  } else {
    launch_update<float>(running_mean, running_var, batch_mean, batch_var, momentum, unbias);
  }
}

constexpr BnActDevice kCuda{bn_act_fwd_train_cuda, bn_act_fwd_eval_cuda, update_running_stats_cuda};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps) {
  return bn_act(input, residual, weight, bias, running_mean, running_var, training, momentum, eps, kCuda);
}

} // namespace

} // namespace fused_resnet::cuda

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("bn_act", TORCH_FN(fused_resnet::cuda::bn_act_cuda));
}
