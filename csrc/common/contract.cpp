// The op contract's checks and layout rule (contract.h). Messages are written as Python writes
// them (fused_resnet/contract.py): shapes as (2, 4, 3, 3), dtypes as torch.float32.
#include "contract.h"

#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace fused_resnet {

namespace {

std::string shape_str(at::IntArrayRef shape) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    s << (i ? ", " : "") << shape[i];
  }
  s << (shape.size() == 1 ? ",)" : ")");
  return s.str();
}

// The Python name of a dtype, torch.<name>.
std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

bool is_floating(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.defined(), op, ": input is undefined");
  TORCH_CHECK_TYPE(
      is_floating(input.scalar_type()), op,
      ": expected a floating-point input (float16, bfloat16, float32 or float64), got ",
      dtype_str(input.scalar_type()));
  TORCH_CHECK_VALUE(
      input.dim() >= 2, op, ": expected an input of at least 2 dimensions (N, C, ...), got ",
      input.dim(), "D input of shape ", shape_str(input.sizes()));
}

void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(
      t.device() == input.device(), op, ": expected all tensors on ", input.device(), ", but ",
      name, " is on ", t.device());
}

void check_activation(
    const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  check_device(op, name, t, input);
  TORCH_CHECK_VALUE(
      t.sizes() == input.sizes(), op, ": ", name, " shape ", shape_str(t.sizes()),
      " does not match input shape ", shape_str(input.sizes()));
  TORCH_CHECK_TYPE(
      t.scalar_type() == input.scalar_type(), op, ": ", name, " dtype ",
      dtype_str(t.scalar_type()), " does not match input dtype ", dtype_str(input.scalar_type()));
}

void check_per_channel(
    const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  check_device(op, name, t, input);
  const int64_t C = input.size(1);
  TORCH_CHECK_VALUE(
      t.dim() == 1 && t.size(0) == C, op, ": ", name,
      " should hold one value per channel, shape (", C, ",) for input of shape ",
      shape_str(input.sizes()), ", got shape ", shape_str(t.sizes()));
  const auto in = input.scalar_type();
  const bool reduced = in == at::kHalf || in == at::kBFloat16;
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(
      dt == in || (reduced && dt == at::kFloat), op, ": ", name, " dtype ", dtype_str(dt),
      " is not supported with a ", dtype_str(in), " input (expected ", dtype_str(in),
      reduced ? " or torch.float32)" : ")");
}

void check_per_channel(
    const char* op, const char* name, const OptTensor& t, const at::Tensor& input) {
  if (given(t)) {
    check_per_channel(op, name, *t, input);
  }
}

void check_act_mask(
    const char* op, const at::Tensor& mask, const at::Tensor& input, int64_t expected) {
  check_device(op, "act_mask", mask, input);
  TORCH_CHECK_TYPE(
      mask.scalar_type() == at::kByte && mask.dim() == 1, op,
      ": act_mask should be a 1-D torch.uint8 tensor, got ", dtype_str(mask.scalar_type()),
      " of shape ", shape_str(mask.sizes()));
  const int64_t n = mask.numel();
  if (expected == 0) {
    TORCH_CHECK_VALUE(
        n == 0, op, ": act_mask holds ", n,
        " bytes; expected none (this backend's bn_act_fwd_train keeps no mask for this input)");
  } else {
    TORCH_CHECK_VALUE(
        n == 0 || n == expected, op, ": act_mask holds ", n, " bytes; expected none or ",
        expected, " (the mask this backend's bn_act_fwd_train returns for this input)");
  }
}

// x̂ = (x - mean) / sqrt(var + eps): eps > 0 where a batch's variance, which can be 0, normalizes;
// eps >= 0 where the running variance does (contract.check_eps). A stream prints a double as
// %g, as Python's f"{eps:g}" does: both halves give the same message.
void check_eps(const char* op, double eps, bool batch_statistics) {
  TORCH_CHECK_VALUE(
      !batch_statistics || eps > 0, op,
      ": eps must be positive when normalizing with batch statistics, got ", eps);
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be non-negative, got ", eps);
}

// The activation by its schema name (contract.ACTIVATIONS, in Act's order).
constexpr const char* kActNames[] = {"relu", "relu6", "leaky_relu", "identity",
                                     "silu", "hardswish", "gelu", "gelu_tanh"};

int act_index(c10::string_view act) {
  for (int i = 0; i < 8; ++i) {
    if (act == kActNames[i]) {
      return i;
    }
  }
  return -1;
}

Activation check_act(const char* op, c10::string_view act, double negative_slope) {
  const int index = act_index(act);
  TORCH_CHECK_VALUE(
      index >= 0, op, ": unknown activation '", std::string(act),
      "'; expected one of relu, relu6, leaky_relu, identity, silu, hardswish, gelu, gelu_tanh");
  const Activation a{static_cast<Act>(index), negative_slope};
  TORCH_CHECK_VALUE(
      a.kind != Act::kLeakyRelu || negative_slope >= 0, op,
      ": leaky_relu's negative_slope must be >= 0 for the fused op (got ", negative_slope,
      "): the backward tells the side of the kink from the output's sign");
  return a;
}

// Whether the backward of the activation named `act` reads out (backward_reads_out), read before
// the name is checked: an unknown one reads no out and keeps no mask, and is refused after the
// other arguments, in schema order.
bool reads_out(c10::string_view act) {
  return act == "relu" || act == "relu6" || act == "leaky_relu";
}

// out of a backward op: required where the backward reads it.
void check_out(const char* op, const OptTensor& out, const at::Tensor& input, c10::string_view act) {
  TORCH_CHECK_VALUE(
      given(out) || !reads_out(act), op, ": out is required for the backward of ", std::string(act));
  if (given(out)) {
    check_activation(op, "out", *out, input);
  }
}

void check_activation(
    const char* op, const char* name, const OptTensor& t, const at::Tensor& input) {
  if (given(t)) {
    check_activation(op, name, *t, input);
  }
}

// The layout rule (contract.h).
View canonical_view(const at::Tensor& input) {
  View g;
  g.N = input.size(0);
  g.C = input.size(1);
  g.S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) {
    g.S *= input.size(d);
  }
  if (input.is_contiguous()) {
    g.x = input;
    g.format = at::MemoryFormat::Contiguous;
  } else if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    g.x = input;
    g.format = at::MemoryFormat::ChannelsLast;
  } else if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    g.x = input;
    g.format = at::MemoryFormat::ChannelsLast3d;
  } else {
    // Sliced, transposed, expanded...: one copy to contiguous NC*.
    g.format = at::MemoryFormat::Contiguous;
    g.x = input.contiguous();
  }
  g.rows = g.format != at::MemoryFormat::Contiguous || g.S == 1;
  return g;
}

// t in the canonical input's memory format: a no-op when it already has it (size-1 dims do not
// matter for the addressing).
at::Tensor in_input_format(const at::Tensor& t, const View& g) {
  return t.contiguous(g.format);
}

at::Tensor residual_in_input_format(const OptTensor& residual, const View& g) {
  return given(residual) ? in_input_format(*residual, g) : at::Tensor();
}

// The backward operands: out where the backward reads it, the residual where it recomputes z.
BwdOperands bwd_operands_of(
    const View& g, const at::Tensor& grad_out, const OptTensor& out, const OptTensor& residual,
    const Activation& act) {
  BwdOperands in{g, in_input_format(grad_out, g), at::Tensor(), at::Tensor(), act};
  if (backward_reads_out(act.kind)) {
    in.out = in_input_format(*out, g);
  }
  if (backward_recomputes_z(act.kind)) {
    in.residual = residual_in_input_format(residual, g);
  }
  return in;
}

} // namespace

Act act_of(c10::string_view act) {
  const int index = act_index(act);
  TORCH_CHECK(index >= 0, "fused_resnet: unknown activation '", std::string(act), "'");
  return static_cast<Act>(index);
}

FwdOperands bn_act_operands(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool training, double eps, c10::string_view act, double negative_slope) {
  constexpr const char* op = "bn_act";
  check_input(op, input);
  if (given(residual)) {
    check_activation(op, "residual", *residual, input);
  }
  check_per_channel(op, "weight", weight, input);
  check_per_channel(op, "bias", bias, input);
  check_per_channel(op, "running_mean", running_mean, input);
  check_per_channel(op, "running_var", running_var, input);
  TORCH_CHECK_VALUE(
      given(running_mean) == given(running_var), op,
      ": running_mean and running_var must be given together");
  TORCH_CHECK_VALUE(
      training || given(running_mean), op,
      ": running_mean and running_var are required when training=False (eval mode normalizes "
      "with the running statistics)");
  check_eps(op, eps, training);
  const Activation a = check_act(op, act, negative_slope);
  const View g = canonical_view(input);
  if (training) {
    std::ostringstream size;
    if (g.M() == 1) {
      size << "torch.Size([";
      for (int64_t d = 0; d < input.dim(); ++d) {
        size << (d ? ", " : "") << input.size(d);
      }
      size << "])";
    }
    TORCH_CHECK_VALUE(
        g.M() != 1, "Expected more than 1 value per channel when training, got input size ",
        size.str());
  }
  return {g, residual_in_input_format(residual, g), a};
}

FwdOperands fwd_train_operands(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, double eps, c10::string_view act, double negative_slope) {
  constexpr const char* op = "bn_act_fwd_train";
  check_input(op, input);
  check_activation(op, "residual", residual, input);
  check_per_channel(op, "weight", weight, input);
  check_per_channel(op, "bias", bias, input);
  check_eps(op, eps, true);
  const Activation a = check_act(op, act, negative_slope);
  const View g = canonical_view(input);
  return {g, residual_in_input_format(residual, g), a};
}

FwdOperands fwd_eval_operands(
    const at::Tensor& input, const OptTensor& residual, const at::Tensor& running_mean,
    const at::Tensor& running_var, const OptTensor& weight, const OptTensor& bias, double eps,
    c10::string_view act, double negative_slope) {
  constexpr const char* op = "bn_act_fwd_eval";
  check_input(op, input);
  check_activation(op, "residual", residual, input);
  check_per_channel(op, "running_mean", running_mean, input);
  check_per_channel(op, "running_var", running_var, input);
  check_per_channel(op, "weight", weight, input);
  check_per_channel(op, "bias", bias, input);
  check_eps(op, eps, false);
  const Activation a = check_act(op, act, negative_slope);
  const View g = canonical_view(input);
  return {g, residual_in_input_format(residual, g), a};
}

BwdOperands bwd_operands(
    const at::Tensor& grad_out, const OptTensor& out, const at::Tensor& act_mask,
    const at::Tensor& input, const OptTensor& weight, const at::Tensor& mean,
    const at::Tensor& invstd, ActMaskBytes act_mask_bytes, const OptTensor& residual,
    const OptTensor& bias, c10::string_view act, double negative_slope) {
  constexpr const char* op = "bn_act_bwd";
  check_input(op, input);
  check_activation(op, "grad_out", grad_out, input);
  check_out(op, out, input, act);
  const View g = canonical_view(input);
  check_act_mask(op, act_mask, input, act_mask_bytes(g, reads_out(act)));
  check_per_channel(op, "weight", weight, input);
  check_per_channel(op, "mean", mean, input);
  check_per_channel(op, "invstd", invstd, input);
  check_activation(op, "residual", residual, input);
  check_per_channel(op, "bias", bias, input);
  const Activation a = check_act(op, act, negative_slope);
  return bwd_operands_of(g, grad_out, out, residual, a);
}

View stats_operands(const at::Tensor& input) {
  check_input("bn_stats", input);
  return canonical_view(input);
}

BwdOperands bwd_reduce_operands(
    const at::Tensor& grad_out, const OptTensor& out, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& invstd, const OptTensor& residual,
    const OptTensor& weight, const OptTensor& bias, c10::string_view act, double negative_slope) {
  constexpr const char* op = "bn_act_bwd_reduce";
  check_input(op, input);
  check_activation(op, "grad_out", grad_out, input);
  check_out(op, out, input, act);
  check_per_channel(op, "mean", mean, input);
  check_per_channel(op, "invstd", invstd, input);
  check_activation(op, "residual", residual, input);
  check_per_channel(op, "weight", weight, input);
  check_per_channel(op, "bias", bias, input);
  const Activation a = check_act(op, act, negative_slope);
  return bwd_operands_of(canonical_view(input), grad_out, out, residual, a);
}

BwdOperands bwd_apply_operands(
    const at::Tensor& grad_out, const OptTensor& out, const at::Tensor& input,
    const OptTensor& weight, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& mean_dz, const at::Tensor& mean_dz_xhat, const OptTensor& residual,
    const OptTensor& bias, c10::string_view act, double negative_slope) {
  constexpr const char* op = "bn_act_bwd_apply";
  check_input(op, input);
  check_activation(op, "grad_out", grad_out, input);
  check_out(op, out, input, act);
  check_per_channel(op, "weight", weight, input);
  check_per_channel(op, "mean", mean, input);
  check_per_channel(op, "invstd", invstd, input);
  check_per_channel(op, "mean_dz", mean_dz, input);
  check_per_channel(op, "mean_dz_xhat", mean_dz_xhat, input);
  check_activation(op, "residual", residual, input);
  check_per_channel(op, "bias", bias, input);
  const Activation a = check_act(op, act, negative_slope);
  return bwd_operands_of(canonical_view(input), grad_out, out, residual, a);
}

} // namespace fused_resnet
