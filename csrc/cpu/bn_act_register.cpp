// CPU kernels of the fused_resnet ops (schemas in csrc/fused_resnet.cpp). The forward ops are
// composed from the CPU forwards by csrc/common/bn_act_module.cpp.
#include <torch/library.h>

#include "bn_act_cpu.h"

namespace fused_resnet::cpu {

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_cpu(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool training, double momentum, double eps) {
  return bn_act(
      input, residual, weight, bias, running_mean, running_var, training, momentum, eps,
      kCpuForwards);
}

TrainOutputs bn_act_fwd_train_cpu(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, double eps) {
  return bn_act_fwd_train(input, residual, weight, bias, eps, kCpuForwards);
}

at::Tensor bn_act_fwd_eval_cpu(
    const at::Tensor& input, const OptTensor& residual, const at::Tensor& running_mean,
    const at::Tensor& running_var, const OptTensor& weight, const OptTensor& bias, double eps) {
  return bn_act_fwd_eval(
      input, residual, running_mean, running_var, weight, bias, eps, kCpuForwards);
}

} // namespace

} // namespace fused_resnet::cpu

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("bn_act", TORCH_FN(fused_resnet::cpu::bn_act_cpu));
  m.impl("bn_act_fwd_train", TORCH_FN(fused_resnet::cpu::bn_act_fwd_train_cpu));
  m.impl("bn_act_fwd_eval", TORCH_FN(fused_resnet::cpu::bn_act_fwd_eval_cpu));
  m.impl("bn_act_bwd", TORCH_FN(fused_resnet::cpu::bn_act_bwd_cpu));
  m.impl("bn_stats", TORCH_FN(fused_resnet::cpu::bn_stats_cpu));
  m.impl("bn_act_bwd_reduce", TORCH_FN(fused_resnet::cpu::bn_act_bwd_reduce_cpu));
  m.impl("bn_act_bwd_apply", TORCH_FN(fused_resnet::cpu::bn_act_bwd_apply_cpu));
}
