// The forward ops of every C++ backend, composed once from a device's two forwards: bn_act (the op
// one module call runs: schema and math in csrc/fused_resnet.cpp), bn_act_fwd_train and
// bn_act_fwd_eval. Each checks its arguments through the op contract (contract.h) before the
// device computes or changes anything.
#pragma once

#include "contract.h"
#include "running_stats.h"

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fused_resnet {

// The running buffers a training forward updates in its per-channel finalize (running_stats.h).
struct RunningBuffers {
  at::Tensor mean;
  at::Tensor var;
  double momentum;
};

// The update of `running` after a batch of M > 1 values per channel; a no-op one when `running`
// is null (nothing tracked) or M == 0 (an empty batch leaves the buffers as they are).
template <typename A>
RunningStatsUpdate<A> running_stats_update(const RunningBuffers* running, int64_t M) {
  RunningStatsUpdate<A> u;
  if (running == nullptr || M == 0) {
    return u;
  }
  const auto acc = c10::CppTypeToScalarType<A>::value;
  u.mean = running->mean.mutable_data_ptr();
  u.var = running->var.mutable_data_ptr();
  u.mean_stride = running->mean.stride(0);
  u.var_stride = running->var.stride(0);
  u.mean_is_acc = running->mean.scalar_type() == acc;
  u.var_is_acc = running->var.scalar_type() == acc;
  u.keep = static_cast<A>(1.0 - running->momentum);
  u.take_mean = static_cast<A>(running->momentum);
  u.take_var = static_cast<A>(
      running->momentum * static_cast<double>(M) / static_cast<double>(M - 1));
  return u;
}

using TrainOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// A device's forwards, on checked operands.
struct BnActDevice {
  // (out, save_mean, save_invstd, batch_var, relu_mask), as bn_act_fwd_train; `running` (or
  // null) is updated on the way.
  TrainOutputs (*fwd_train)(
      const FwdOperands& in, const OptTensor& weight, const OptTensor& bias, double eps,
      const RunningBuffers* running);
  at::Tensor (*fwd_eval)(
      const FwdOperands& in, const at::Tensor& running_mean, const at::Tensor& running_var,
      const OptTensor& weight, const OptTensor& bias, double eps);
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool training, double momentum, double eps, const BnActDevice& device);

TrainOutputs bn_act_fwd_train(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, double eps, const BnActDevice& device);

at::Tensor bn_act_fwd_eval(
    const at::Tensor& input, const OptTensor& residual, const at::Tensor& running_mean,
    const at::Tensor& running_var, const OptTensor& weight, const OptTensor& bias, double eps,
    const BnActDevice& device);

} // namespace fused_resnet
