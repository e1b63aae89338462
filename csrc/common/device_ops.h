// The seven ops of a C++ device (schemas and math in csrc/fused_resnet.cpp), composed once: each
// registered op checks its arguments through the op contract (contract.h), then runs the
// device's implementation on the checked operands. A device supplies DeviceOps; its
// TORCH_LIBRARY_IMPL calls register_device_ops<kDeviceOps>(m).
#pragma once

#include "contract.h"
#include "running_stats.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

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

// (out, save_mean, save_invstd, batch_var, act_mask): bn_act_fwd_train's outputs.
using TrainOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// (out, save_mean, save_invstd, act_mask): bn_act's outputs.
using BnActOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// (grad_input, grad_residual, grad_weight, grad_bias): bn_act_bwd's outputs.
using BwdOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using TensorPair = std::tuple<at::Tensor, at::Tensor>;

// Outputs every device allocates alike (device_ops.cpp): a [C] vector in the accumulation dtype
// (statistics, sums), and the 0-element tensor that stands for an output not asked for.
at::Tensor empty_channel_stat(const View& g);
at::Tensor no_tensor(const View& g);

// A device's implementation of the ops, on operands the contract has checked, of a non-empty
// input (numel > 0: N·S > 0 and C > 0; device_ops.cpp answers an empty one).
struct DeviceOps {
  // (out, save_mean, save_invstd, batch_var, act_mask), as bn_act_fwd_train; `running` (or
  // null) is updated on the way. The forwards read in.act.
  TrainOutputs (*fwd_train)(
      const FwdOperands& in, const OptTensor& weight, const OptTensor& bias, double eps,
      const RunningBuffers* running);
  at::Tensor (*fwd_eval)(
      const FwdOperands& in, const at::Tensor& running_mean, const at::Tensor& running_var,
      const OptTensor& weight, const OptTensor& bias, double eps);
  // The backward ops read in.act; weight and bias (and in.residual) recompute z where the
  // activation needs it (backward_recomputes_z).
  BwdOutputs (*bwd)(
      const BwdOperands& in, const at::Tensor& act_mask, const OptTensor& weight,
      const OptTensor& bias, const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats,
      bool residual_grad);
  TensorPair (*stats)(const View& g);
  TensorPair (*bwd_reduce)(
      const BwdOperands& in, const OptTensor& weight, const OptTensor& bias,
      const at::Tensor& mean, const at::Tensor& invstd);
  TensorPair (*bwd_apply)(
      const BwdOperands& in, const OptTensor& weight, const OptTensor& bias,
      const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& mean_dz,
      const at::Tensor& mean_dz_xhat, bool residual_grad);
  // The length of the act_mask fwd_train returns for an input.
  ActMaskBytes act_mask_bytes;
};

// The ops, composed from a device's (device_ops.cpp).
BnActOutputs bn_act(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool training, double momentum, double eps, c10::string_view act, double negative_slope, const DeviceOps& device);
TrainOutputs bn_act_fwd_train(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, double eps, c10::string_view act, double negative_slope, const DeviceOps& device);
at::Tensor bn_act_fwd_eval(
    const at::Tensor& input, const OptTensor& residual, const at::Tensor& running_mean,
    const at::Tensor& running_var, const OptTensor& weight, const OptTensor& bias, double eps,
    c10::string_view act, double negative_slope, const DeviceOps& device);
BwdOutputs bn_act_bwd(
    const at::Tensor& grad_out, const OptTensor& out, const at::Tensor& act_mask,
    const at::Tensor& input, const OptTensor& weight, const at::Tensor& mean,
    const at::Tensor& invstd, bool batch_stats, bool residual_grad, const OptTensor& residual,
    const OptTensor& bias, c10::string_view act, double negative_slope, const DeviceOps& device);
TensorPair bn_stats(const at::Tensor& input, const DeviceOps& device);
TensorPair bn_act_bwd_reduce(
    const at::Tensor& grad_out, const OptTensor& out, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& invstd, const OptTensor& residual,
    const OptTensor& weight, const OptTensor& bias, c10::string_view act, double negative_slope, const DeviceOps& device);
TensorPair bn_act_bwd_apply(
    const at::Tensor& grad_out, const OptTensor& out, const at::Tensor& input,
    const OptTensor& weight, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& mean_dz, const at::Tensor& mean_dz_xhat, bool residual_grad,
    const OptTensor& residual, const OptTensor& bias, c10::string_view act, double negative_slope, const DeviceOps& device);

// The ops of one device as functions TORCH_FN can take.
template <const DeviceOps& kDevice>
struct RegisteredOps {
  static BnActOutputs bn_act(
      const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
      const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
      bool training, double momentum, double eps, c10::string_view act, double negative_slope) {
    return fused_resnet::bn_act(
        input, residual, weight, bias, running_mean, running_var, training, momentum, eps, act,
        negative_slope, kDevice);
  }
  static TrainOutputs fwd_train(
      const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
      const OptTensor& bias, double eps, c10::string_view act, double negative_slope) {
    return bn_act_fwd_train(input, residual, weight, bias, eps, act, negative_slope, kDevice);
  }
  static at::Tensor fwd_eval(
      const at::Tensor& input, const OptTensor& residual, const at::Tensor& running_mean,
      const at::Tensor& running_var, const OptTensor& weight, const OptTensor& bias,
      double eps, c10::string_view act, double negative_slope) {
    return bn_act_fwd_eval(
        input, residual, running_mean, running_var, weight, bias, eps, act, negative_slope,
        kDevice);
  }
  static BwdOutputs bwd(
      const at::Tensor& grad_out, const OptTensor& out, const at::Tensor& act_mask,
      const at::Tensor& input, const OptTensor& weight, const at::Tensor& mean,
      const at::Tensor& invstd, bool batch_stats, bool residual_grad, const OptTensor& residual,
      const OptTensor& bias, c10::string_view act, double negative_slope) {
    return bn_act_bwd(
        grad_out, out, act_mask, input, weight, mean, invstd, batch_stats, residual_grad,
        residual, bias, act, negative_slope, kDevice);
  }
  static TensorPair stats(const at::Tensor& input) {
    return bn_stats(input, kDevice);
  }
  static TensorPair bwd_reduce(
      const at::Tensor& grad_out, const OptTensor& out, const at::Tensor& input,
      const at::Tensor& mean, const at::Tensor& invstd, const OptTensor& residual,
      const OptTensor& weight, const OptTensor& bias, c10::string_view act, double negative_slope) {
    return bn_act_bwd_reduce(
        grad_out, out, input, mean, invstd, residual, weight, bias, act, negative_slope, kDevice);
  }
  static TensorPair bwd_apply(
      const at::Tensor& grad_out, const OptTensor& out, const at::Tensor& input,
      const OptTensor& weight, const at::Tensor& mean, const at::Tensor& invstd,
      const at::Tensor& mean_dz, const at::Tensor& mean_dz_xhat, bool residual_grad,
      const OptTensor& residual, const OptTensor& bias, c10::string_view act, double negative_slope) {
    return bn_act_bwd_apply(
        grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat, residual_grad,
        residual, bias, act, negative_slope, kDevice);
  }
};

// Registers the seven ops of kDevice in a TORCH_LIBRARY_IMPL block.
template <const DeviceOps& kDevice>
void register_device_ops(torch::Library& m) {
  using Ops = RegisteredOps<kDevice>;
  m.impl("bn_act", TORCH_FN(Ops::bn_act));
  m.impl("_bn_act_fwd_train", TORCH_FN(Ops::fwd_train));
  m.impl("_bn_act_fwd_eval", TORCH_FN(Ops::fwd_eval));
  m.impl("_bn_act_bwd", TORCH_FN(Ops::bwd));
  m.impl("_bn_stats", TORCH_FN(Ops::stats));
  m.impl("_bn_act_bwd_reduce", TORCH_FN(Ops::bwd_reduce));
  m.impl("_bn_act_bwd_apply", TORCH_FN(Ops::bwd_apply));
}

} // namespace fused_resnet
