// Host-side checks and layout selection shared by the CPU and CUDA kernels.
#include "bn_act_host.h"

namespace fused_resnet {

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

} // namespace

Geometry canonicalize_input(
    const at::Tensor& input, const char* op, c10::DeviceType device_type) {
  TORCH_CHECK(input.defined(), op, ": input is undefined");
  TORCH_CHECK(
      at::isFloatingType(input.scalar_type()),
      op, ": expected a floating-point input, got ", input.scalar_type());
  TORCH_CHECK(
      supported_dtype(input.scalar_type()),
      op, ": unsupported input dtype ", input.scalar_type(),
      " (expected Float, Double, Half or BFloat16)");
  TORCH_CHECK(
      input.dim() >= 2,
      op, ": expected an input of at least 2 dimensions (N, C, *), got ", input.dim(),
      "D input of shape ", input.sizes());
  TORCH_CHECK(
      input.device().type() == device_type,
      op, ": expected a ", c10::DeviceTypeName(device_type), " input, got ", input.device());

  Geometry g;
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
    // Sliced, transposed, expanded...: one copy to contiguous NC* (the layout the fake impls in
    // fused_resnet/ops.py promise for such inputs).
    g.format = at::MemoryFormat::Contiguous;
    g.x = input.contiguous();
  }
  g.rows = g.format != at::MemoryFormat::Contiguous || g.S == 1;
  return g;
}

at::Tensor activation_like_input(
    const at::Tensor& t, const at::Tensor& input, const Geometry& g, const char* name,
    const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(
      t.sizes() == input.sizes(),
      op, ": ", name, " shape ", t.sizes(), " does not match input shape ", input.sizes());
  TORCH_CHECK(
      t.scalar_type() == input.scalar_type(),
      op, ": ", name, " dtype ", t.scalar_type(), " does not match input dtype ",
      input.scalar_type());
  TORCH_CHECK(
      t.device() == input.device(),
      op, ": ", name, " is on ", t.device(), " but input is on ", input.device());
  // A no-op when t already has that layout (size-1 dims do not matter for the addressing).
  return t.contiguous(g.format);
}

void check_param(
    const at::Tensor& t, const at::Tensor& input, int64_t C, const char* name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(
      t.dim() == 1 && t.size(0) == C,
      op, ": expected ", name, " to be a 1-D tensor with one entry per channel (", C,
      "), got shape ", t.sizes());
  const auto dt = t.scalar_type();
  const auto in = input.scalar_type();
  if (in == at::kFloat) {
    TORCH_CHECK(
        dt == at::kFloat,
        op, ": ", name, " dtype ", dt, " is not allowed for a Float input (expected Float)");
  } else {
    TORCH_CHECK(
        dt == in || dt == at::kFloat,
        op, ": ", name, " dtype ", dt, " is not allowed for a ", in, " input (expected ", in,
        " or Float)");
  }
  TORCH_CHECK(
      t.device() == input.device(),
      op, ": ", name, " is on ", t.device(), " but input is on ", input.device());
}

} // namespace fused_resnet
