// The forward ops composed from a device's forwards (bn_act_module.h).
#include "bn_act_module.h"

#include <ATen/ops/empty.h>
#include <ATen/record_function.h>

namespace fused_resnet {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool training, double momentum, double eps, const BnActDevice& device) {
  // The name a profiler trace shows for every backend's forward (fused_resnet/profiling.py).
  RECORD_FUNCTION(
      given(residual) ? "fused_resnet::bn_add_relu_fwd" : "fused_resnet::bn_relu_fwd",
      std::vector<c10::IValue>());
  const FwdOperands in =
      bn_act_operands(input, residual, weight, bias, running_mean, running_var, training);
  if (!training) {  // no batch statistics, no mask
    at::Tensor out = device.fwd_eval(in, *running_mean, *running_var, weight, bias, eps);
    const auto none = input.options().dtype(acc_dtype(input.scalar_type()));
    return {out, at::empty({0}, none), at::empty({0}, none),
            at::empty({0}, input.options().dtype(at::kByte))};
  }
  std::optional<RunningBuffers> running;
  if (given(running_mean)) {
    running = RunningBuffers{*running_mean, *running_var, momentum};
  }
  auto [out, mean, invstd, var, relu_mask] =
      device.fwd_train(in, weight, bias, eps, running ? &*running : nullptr);
  return {out, mean, invstd, relu_mask};
}

TrainOutputs bn_act_fwd_train(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, double eps, const BnActDevice& device) {
  return device.fwd_train(
      fwd_train_operands(input, residual, weight, bias), weight, bias, eps, nullptr);
}

at::Tensor bn_act_fwd_eval(
    const at::Tensor& input, const OptTensor& residual, const at::Tensor& running_mean,
    const at::Tensor& running_var, const OptTensor& weight, const OptTensor& bias, double eps,
    const BnActDevice& device) {
  return device.fwd_eval(
      fwd_eval_operands(input, residual, running_mean, running_var, weight, bias),
      running_mean, running_var, weight, bias, eps);
}

} // namespace fused_resnet
