// bn_act composed from a device's pieces: checks, then the forward, then the in-place running
// statistics update, so that a refused call changes nothing.
#include "bn_act_module.h"

#include "bn_act_host.h"

#include <ATen/ops/empty.h>

namespace fused_resnet {

namespace {

bool given(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act(
    const at::Tensor& input, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    bool training, double momentum, double eps, const BnActDevice& device) {
  constexpr const char* op = "bn_act";
  const bool tracks = given(running_mean);
  TORCH_CHECK(
      tracks == given(running_var), op, ": running_mean and running_var must be given together");
  TORCH_CHECK(
      training || tracks, op,
      ": running_mean and running_var are required when training=False (eval mode normalizes "
      "with the running statistics)");
  TORCH_CHECK(input.dim() >= 2, op, ": expected an input of at least 2 dimensions (N, C, *), got ",
              input.dim(), "D input of shape ", input.sizes());
  const int64_t channels = input.size(1);
  const int64_t count = channels > 0 ? input.numel() / channels : 0;
  if (tracks) {
    check_param(*running_mean, input, channels, "running_mean", op);
    check_param(*running_var, input, channels, "running_var", op);
  }
  if (!training) {
    at::Tensor out =
        device.fwd_eval(input, residual, *running_mean, *running_var, weight, bias, eps);
    const auto none = input.options().dtype(acc_dtype(input.scalar_type()));
    return {out, at::empty({0}, none), at::empty({0}, none),
            at::empty({0}, input.options().dtype(at::kByte))};
  }
  TORCH_CHECK(
      count != 1, "Expected more than 1 value per channel when training, got input size ",
      input.sizes());
  auto [out, mean, invstd, var, relu_mask] = device.fwd_train(input, residual, weight, bias, eps);
  if (tracks && count > 0) {
    device.update_running_stats(
        *running_mean, *running_var, mean, var, momentum,
        static_cast<double>(count) / static_cast<double>(count - 1));
  }
  return {out, mean, invstd, relu_mask};
}

} // namespace fused_resnet
