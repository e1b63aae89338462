// bn_act on the CPU: the training / eval forwards of bn_act_fwd.cpp, and the running-statistics
// update as a loop over the channels (C values each, in the op, with no further ATen op).
#include "bn_act_cpu.h"

#include "common/bn_act_module.h"

namespace fused_resnet::cpu {

namespace {

// buffer[c] <- (1 - momentum) * buffer[c] + momentum * scale * batch[c], in the acc dtype A of
// the batch statistics, stored in the buffer's dtype B (any stride).
template <typename B, typename A>
void blend(const at::Tensor& buffer, const at::Tensor& batch, double momentum, double scale) {
  B* p = buffer.mutable_data_ptr<B>();
  const A* q = batch.const_data_ptr<A>();
  const int64_t stride = buffer.stride(0);
  const A keep = static_cast<A>(1.0 - momentum);
  const A take = static_cast<A>(momentum * scale);
  for (int64_t c = 0; c < buffer.size(0); ++c) {
    p[c * stride] = static_cast<B>(static_cast<A>(p[c * stride]) * keep + q[c] * take);
  }
}

template <typename A>
void blend_into(const at::Tensor& buffer, const at::Tensor& batch, double momentum, double scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, buffer.scalar_type(), "fused_resnet_running_stats",
      [&] { blend<scalar_t, A>(buffer, batch, momentum, scale); });
}

void update_running_stats_cpu(
    const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& batch_mean,
    const at::Tensor& batch_var, double momentum, double unbias) {
  if (batch_mean.scalar_type() == at::kDouble) {
    blend_into<double>(running_mean, batch_mean, momentum, 1.0);
    blend_into<double>(running_var, batch_var, momentum, unbias);
  } else {
    blend_into<float>(running_mean, batch_mean, momentum, 1.0);
    blend_into<float>(running_var, batch_var, momentum, unbias);
  }
}

constexpr BnActDevice kCpu{bn_act_fwd_train_cpu, bn_act_fwd_eval_cpu, update_running_stats_cpu};

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps) {
  return bn_act(input, residual, weight, bias, running_mean, running_var, training, momentum, eps, kCpu);
}

} // namespace fused_resnet::cpu
