// The ops composed from a device's implementation (device_ops.h): the op contract first, so that
// a refused call changes nothing, then the device. An empty input (no values, or no channels)
// reaches no device: its statistics and sums are 0 (invstd 1/sqrt(eps)), its activations empty,
// and the running statistics stay as they are.
#include "device_ops.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>

#include <cmath>

namespace fused_resnet {

namespace {

at::Tensor empty_activation(const View& g) {
  return at::empty_like(g.x, at::MemoryFormat::Preserve);
}

at::Tensor channel_zeros(const View& g) {
  return at::zeros({g.C}, g.x.options().dtype(acc_dtype(g.x.scalar_type())));
}

TrainOutputs empty_train_outputs(const View& g, double eps) {
  const auto acc = g.x.options().dtype(acc_dtype(g.x.scalar_type()));
  return {empty_activation(g), channel_zeros(g), at::full({g.C}, 1.0 / std::sqrt(eps), acc),
          channel_zeros(g), at::empty({0}, g.x.options().dtype(at::kByte))};
}

} // namespace

at::Tensor empty_channel_stat(const View& g) {
  return at::empty({g.C}, g.x.options().dtype(acc_dtype(g.x.scalar_type())));
}

at::Tensor no_tensor(const View& g) {
  return at::empty({0}, g.x.options());
}

BnActOutputs bn_act(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool training, double momentum, double eps, c10::string_view act, double negative_slope, const DeviceOps& device) {
  const FwdOperands in = bn_act_operands(
      input, residual, weight, bias, running_mean, running_var, training, eps, act, negative_slope);
  // The name a profiler trace shows for every backend's forward (fused_resnet/trace_names.py).
  RECORD_FUNCTION(trace_name(in.act.kind, given(residual), true), std::vector<c10::IValue>());
  if (!training) {  // no batch statistics, no mask
    at::Tensor out = in.g.numel() == 0
        ? empty_activation(in.g)
        : device.fwd_eval(in, *running_mean, *running_var, weight, bias, eps);
    const auto none = input.options().dtype(acc_dtype(input.scalar_type()));
    return {out, at::empty({0}, none), at::empty({0}, none),
            at::empty({0}, input.options().dtype(at::kByte))};
  }
  std::optional<RunningBuffers> running;
  if (given(running_mean)) {
    running = RunningBuffers{*running_mean, *running_var, momentum};
  }
  auto [out, mean, invstd, var, act_mask] = in.g.numel() == 0
      ? empty_train_outputs(in.g, eps)
      : device.fwd_train(in, weight, bias, eps, running ? &*running : nullptr);
  return {out, mean, invstd, act_mask};
}

TrainOutputs bn_act_fwd_train(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, double eps, c10::string_view act, double negative_slope, const DeviceOps& device) {
  const FwdOperands in = fwd_train_operands(input, residual, weight, bias, eps, act, negative_slope);
  return in.g.numel() == 0 ? empty_train_outputs(in.g, eps)
                           : device.fwd_train(in, weight, bias, eps, nullptr);
}

at::Tensor bn_act_fwd_eval(
    const at::Tensor& input, const OptTensor& residual, const at::Tensor& running_mean,
    const at::Tensor& running_var, const OptTensor& weight, const OptTensor& bias, double eps,
    c10::string_view act, double negative_slope, const DeviceOps& device) {
  const FwdOperands in = fwd_eval_operands(
      input, residual, running_mean, running_var, weight, bias, eps, act, negative_slope);
  return in.g.numel() == 0 ? empty_activation(in.g)
                           : device.fwd_eval(in, running_mean, running_var, weight, bias, eps);
}

BwdOutputs bn_act_bwd(
    const at::Tensor& grad_out, const OptTensor& out, const at::Tensor& act_mask,
    const at::Tensor& input, const OptTensor& weight, const at::Tensor& mean,
    const at::Tensor& invstd, bool batch_stats, bool residual_grad, const OptTensor& residual,
    const OptTensor& bias, c10::string_view act, double negative_slope, const DeviceOps& device) {
  const BwdOperands in = bwd_operands(
      grad_out, out, act_mask, input, weight, mean, invstd, device.act_mask_bytes, residual,
      bias, act, negative_slope);
  if (in.g.numel() == 0) {
    return {empty_activation(in.g), residual_grad ? empty_activation(in.g) : no_tensor(in.g),
            channel_zeros(in.g), channel_zeros(in.g)};
  }
  return device.bwd(in, act_mask, weight, bias, mean, invstd, batch_stats, residual_grad);
}

TensorPair bn_stats(const at::Tensor& input, const DeviceOps& device) {
  const View g = stats_operands(input);
  return g.numel() == 0 ? TensorPair{channel_zeros(g), channel_zeros(g)} : device.stats(g);
}

TensorPair bn_act_bwd_reduce(
    const at::Tensor& grad_out, const OptTensor& out, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& invstd, const OptTensor& residual,
    const OptTensor& weight, const OptTensor& bias, c10::string_view act, double negative_slope, const DeviceOps& device) {
  const BwdOperands in = bwd_reduce_operands(
      grad_out, out, input, mean, invstd, residual, weight, bias, act, negative_slope);
  return in.g.numel() == 0 ? TensorPair{channel_zeros(in.g), channel_zeros(in.g)}
                           : device.bwd_reduce(in, weight, bias, mean, invstd);
}

TensorPair bn_act_bwd_apply(
    const at::Tensor& grad_out, const OptTensor& out, const at::Tensor& input,
    const OptTensor& weight, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& mean_dz, const at::Tensor& mean_dz_xhat, bool residual_grad,
    const OptTensor& residual, const OptTensor& bias, c10::string_view act, double negative_slope, const DeviceOps& device) {
  const BwdOperands in = bwd_apply_operands(
      grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat, residual, bias, act,
      negative_slope);
  if (in.g.numel() == 0) {
    return {empty_activation(in.g), residual_grad ? empty_activation(in.g) : no_tensor(in.g)};
  }
  return device.bwd_apply(in, weight, bias, mean, invstd, mean_dz, mean_dz_xhat, residual_grad);
}

} // namespace fused_resnet
