// bn_act, the op one module call runs (schema and math in csrc/fused_resnet.cpp), composed once
// for every device from that device's training / eval forward and running-statistics update.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fused_resnet {

// A device's pieces of bn_act.
struct BnActDevice {
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*fwd_train)(
      const at::Tensor& input, const std::optional<at::Tensor>& residual,
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps);
  at::Tensor (*fwd_eval)(
      const at::Tensor& input, const std::optional<at::Tensor>& residual,
      const at::Tensor& running_mean, const at::Tensor& running_var,
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps);
  // running <- (1 - momentum) * running + momentum * batch, for the mean and for the variance
  // (batch_var * unbias), in the running buffers' dtype; batch statistics in the acc dtype.
  void (*update_running_stats)(
      const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& batch_mean,
      const at::Tensor& batch_var, double momentum, double unbias);
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps, const BnActDevice& device);

} // namespace fused_resnet
