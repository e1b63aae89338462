// Autograd of bn_act, in C++ as torchvision's ops have theirs: the forward runs the device's
// bn_act below autograd (one op: kernel and running-statistics update), the backward one
// bn_act_bwd. The non-differentiable outputs (save_mean, save_invstd, act_mask) get no
// gradient tensors (materialize_grads off), so nothing is filled with zeros for them.
//
//   training:  grad_input = w·invstd·(dz - Σdz/M - x̂·Σdz·x̂/M), dz = grad_out·act'(z)
//   eval:      grad_input = w·invstd·dz, invstd from the running statistics the forward read
//   grad_residual = dz,  grad_weight = Σdz·x̂,  grad_bias = Σdz   (csrc/fused_resnet.cpp)
//
// It saves what the activation's backward reads and nothing else of an activation's size: out
// (and the mask) for the piecewise-linear ones, the residual (by reference) where z is
// recomputed (activation.h).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include "contract.h"

namespace fused_resnet {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_bn_act(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool training, double momentum, double eps, c10::string_view act, double negative_slope) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fused_resnet::bn_act", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&, const OptTensor&, bool, double, double,
                           c10::string_view, double)>();
  return op.call(
      input, residual, weight, bias, running_mean, running_var, training, momentum, eps, act,
      negative_slope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_bn_act_bwd(
    const at::Tensor& grad_out, const OptTensor& out, const at::Tensor& act_mask,
    const at::Tensor& input, const OptTensor& weight, const at::Tensor& mean,
    const at::Tensor& invstd, bool batch_stats, bool residual_grad, const OptTensor& residual,
    const OptTensor& bias, c10::string_view act, double negative_slope) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fused_resnet::_bn_act_bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const OptTensor&, const at::Tensor&,
                           const at::Tensor&, const OptTensor&, const at::Tensor&,
                           const at::Tensor&, bool, bool, const OptTensor&, const OptTensor&,
                           c10::string_view, double)>();
  return op.call(
      grad_out, out, act_mask, input, weight, mean, invstd, batch_stats, residual_grad, residual,
      bias, act, negative_slope);
}

OptTensor optional(const at::Tensor& t) {
  return t.defined() ? OptTensor(t) : std::nullopt;
}

// A parameter's gradient in the parameter's dtype (the op returns the acc dtype).
at::Tensor param_grad(const at::Tensor& grad, const OptTensor& param, bool needed) {
  if (!needed || !given(param)) {
    return {};
  }
  return grad.scalar_type() == param->scalar_type() ? grad : grad.to(param->scalar_type());
}

class BnActFunction : public torch::autograd::Function<BnActFunction> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const OptTensor& residual,
      const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
      const OptTensor& running_var, bool training, double momentum, double eps,
      c10::string_view act, double negative_slope) {
    at::Tensor out, mean, invstd, act_mask;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, mean, invstd, act_mask) = call_bn_act(
          input, residual, weight, bias, running_mean, running_var, training, momentum, eps, act,
          negative_slope);
    }
    // The statistics the backward uses: the batch's; in eval the running buffers themselves,
    // held as eager's batch norm holds them (no copy and no kernel now, and no version check: a
    // training step that updates them before this backward runs changes its gradient, in eager too).
    if (!training) {
      ctx->saved_data["running_mean"] = *running_mean;
      ctx->saved_data["running_var"] = *running_var;
    }
    if (training && given(running_mean)) {  // updated in place, below autograd
      torch::autograd::increment_version(*running_mean);
      torch::autograd::increment_version(*running_var);
    }
    // Edge indices: forward's tensor arguments that were given, in order.
    int64_t edge = 0;
    auto edge_of = [&](bool present) { return present ? edge++ : int64_t(-1); };
    ctx->saved_data["input_edge"] = edge_of(true);
    ctx->saved_data["residual_edge"] = edge_of(given(residual));
    ctx->saved_data["weight_edge"] = edge_of(given(weight));
    ctx->saved_data["bias_edge"] = edge_of(given(bias));
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = std::string(act);
    ctx->saved_data["negative_slope"] = negative_slope;
    // The activation is valid here: the op above has checked it.
    const Act kind = act_of(act);
    ctx->saved_data["act_kind"] = static_cast<int64_t>(kind);
    const bool reads_out = backward_reads_out(kind);
    const bool recomputes = backward_recomputes_z(kind);
    ctx->save_for_backward(
        {input, reads_out ? out : at::Tensor(), act_mask, given(weight) ? *weight : at::Tensor(),
         given(bias) ? *bias : at::Tensor(), training ? mean : at::Tensor(),
         training ? invstd : at::Tensor(),
         recomputes && given(residual) ? *residual : at::Tensor()});
    ctx->mark_non_differentiable({mean, invstd, act_mask});
    ctx->set_materialize_grads(false);
    return {out, mean, invstd, act_mask};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const OptTensor weight = optional(saved[3]);
    const OptTensor bias = optional(saved[4]);
    auto needs = [&](const char* key) {
      const int64_t e = ctx->saved_data[key].toInt();
      return e >= 0 && ctx->needs_input_grad(e);
    };
    const bool need_input = needs("input_edge"), need_residual = needs("residual_edge");
    const bool need_weight = needs("weight_edge"), need_bias = needs("bias_edge");
    variable_list result(11);
    if (!grads[0].defined() || !(need_input || need_residual || need_weight || need_bias)) {
      return result;
    }
    at::Tensor grad_input, grad_residual, grad_weight, grad_bias;
    // The name a profiler trace shows for every backend's backward (fused_resnet/trace_names.py).
    RECORD_FUNCTION(
        trace_name(
            static_cast<Act>(ctx->saved_data["act_kind"].toInt()),
            ctx->saved_data["residual_edge"].toInt() >= 0, false),
        std::vector<c10::IValue>());
    const bool training = ctx->saved_data["training"].toBool();
    at::Tensor mean = saved[5], invstd = saved[6];
    if (!training) {  // the running statistics: invstd = 1/sqrt(running_var + eps), acc dtype
      const auto acc = acc_dtype(input.scalar_type());
      mean = ctx->saved_data["running_mean"].toTensor().to(acc);
      invstd = ctx->saved_data["running_var"].toTensor().to(acc).add(ctx->saved_data["eps"].toDouble()).rsqrt_();
    }
    {
      // With create_graph, bn_act_bwd goes through its autograd (fused_resnet/ops.py), whose
      // backward says that double backward is not supported; otherwise straight to the kernel.
      std::optional<at::AutoDispatchBelowADInplaceOrView> below_autograd;
      if (!at::GradMode::is_enabled()) {
        below_autograd.emplace();
      }
      const std::string act = ctx->saved_data["act"].toStringRef();
      std::tie(grad_input, grad_residual, grad_weight, grad_bias) = call_bn_act_bwd(
          grads[0], optional(saved[1]), saved[2], input, weight, mean, invstd, training,
          need_residual, optional(saved[7]), bias, act,
          ctx->saved_data["negative_slope"].toDouble());
    }
    result[0] = need_input ? grad_input : at::Tensor();
    result[1] = need_residual ? grad_residual : at::Tensor();
    result[2] = param_grad(grad_weight, weight, need_weight);
    result[3] = param_grad(grad_bias, bias, need_bias);
    return result;
  }
};

bool requires_grad(const OptTensor& t) {
  return given(t) && t->requires_grad();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_autograd(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool training, double momentum, double eps, c10::string_view act, double negative_slope) {
  const bool records = at::GradMode::is_enabled() &&
      (input.requires_grad() || requires_grad(residual) || requires_grad(weight) ||
       requires_grad(bias));
  if (!records) {  // inference, no_grad: the op alone, no graph node
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto result = call_bn_act(
        input, residual, weight, bias, running_mean, running_var, training, momentum, eps, act,
        negative_slope);
    if (training && given(running_mean)) {
      torch::autograd::increment_version(*running_mean);
      torch::autograd::increment_version(*running_var);
    }
    return result;
  }
  auto outputs = BnActFunction::apply(
      input, residual, weight, bias, running_mean, running_var, training, momentum, eps, act,
      negative_slope);
  return {outputs[0], outputs[1], outputs[2], outputs[3]};
}

} // namespace

} // namespace fused_resnet

TORCH_LIBRARY_IMPL(fused_resnet, Autograd, m) {
  m.impl("bn_act", TORCH_FN(fused_resnet::bn_act_autograd));
}
