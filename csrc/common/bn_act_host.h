// Host-side input checks and layout selection shared by every backend of fused_resnet (csrc/cpu,
// csrc/cuda). Device-agnostic: only tensor metadata is read, nothing is launched.
//
// Geometry: the input viewed in one of two native layouts, never converted between them:
//   planes  [N][C][S]   contiguous NC* (NCL, NCHW, NCDHW) with S > 1
//   rows    [N*S][C]    channels_last / channels_last_3d, and any input with S == 1
// Any other strided input is first made contiguous (NC*), and every other activation (residual,
// grad_out, out) is brought to the input's format, so a single linear index addresses all of
// them. Outputs are allocated like the canonical input (fused_resnet.ops.canonical_layout).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fused_resnet {

struct Geometry {
  at::Tensor x;            // the input, dense in `format`
  at::MemoryFormat format; // Contiguous, ChannelsLast or ChannelsLast3d
  bool rows;               // true: [N*S][C] rows of C; false: [N][C][S] planes of S
  int64_t N, C, S;
  int64_t M() const { return N * S; }
  int64_t numel() const { return N * C * S; }
};

// Checks the input (floating dtype, dim >= 2, on a `device_type` device) and picks its native
// layout.
Geometry canonicalize_input(const at::Tensor& input, const char* op, c10::DeviceType device_type);

// Checks that `t` has the input's shape, dtype and device ("residual shape [..] does not match
// input shape [..]"), and returns it in the canonical input's memory format.
at::Tensor activation_like_input(
    const at::Tensor& t, const at::Tensor& input, const Geometry& g, const char* name,
    const char* op);

// Per-channel vectors: checks a 1-D length-C tensor on the input's device whose dtype is the
// input's or float32 (the AMP case; float32 is also the accumulation dtype of every input dtype
// but float64). Any stride.
void check_param(
    const at::Tensor& t, const at::Tensor& input, int64_t C, const char* name, const char* op);

// The accumulation dtype for an input dtype: Double for Double, Float otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

} // namespace fused_resnet
