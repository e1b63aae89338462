// The op contract, C++ half: the layout rule and the argument checks every C++ backend (csrc/cpu,
// csrc/cuda) runs before it computes or changes anything. The Python half
// (fused_resnet/contract.py, for the triton and reference backends and the fake impls) states the
// same rules in the same order, with the same error types and messages:
//
//   input          floating dtype (TypeError), at least 2 dimensions (N, C, *) (ValueError)
//   activations    (residual, grad_out, out): input's device (RuntimeError), shape (ValueError),
//                  dtype (TypeError)
//   per channel    (weight, bias, running statistics, mean, invstd, ...): input's device, shape
//                  (C,) (ValueError), dtype the input's or, for a Half/BFloat16 input, Float
//                  (TypeError)
//   bn_act         running_mean and running_var given together; required when training=False;
//                  more than one value per channel when training (torch's own message)
//   act_mask      empty, or the length the backend's bn_act_fwd_train returns for the input
//   act            one of the activations (activation.h); leaky_relu's negative_slope >= 0
//   out            (backward ops) required where the backward reads it (backward_reads_out)
//
// The input is checked first, then the other arguments in schema order, each for device, shape,
// dtype; the first rule broken raises.
//
// The layout: the input is viewed as one of two native layouts, never converted between them:
//   planes  [N][C][S]   contiguous NC* (NCL, NCHW, NCDHW) with S > 1
//   rows    [N*S][C]    channels_last / channels_last_3d, and any input with S == 1
// Any other strided input is first made contiguous (NC*), and every other activation is brought
// to the input's format, so a single linear index addresses all of them. Outputs are allocated
// like the canonical input (fused_resnet.contract.canonical_layout).
#pragma once

#include "activation.h"

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>

namespace fused_resnet {

using OptTensor = std::optional<at::Tensor>;

inline bool given(const OptTensor& t) {
  return t.has_value() && t->defined();
}

// The accumulation dtype for an input dtype: Double for Double, Float otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The canonical input seen as [N][C][S] (docs/design.md has the vocabulary).
struct View {
  at::Tensor x;             // the input, dense in `format`
  at::MemoryFormat format;  // Contiguous, ChannelsLast or ChannelsLast3d
  int64_t N, C, S;
  bool rows;                // true: [N*S][C] rows of C; false: [N][C][S] planes of S
  int64_t M() const { return N * S; }
  int64_t numel() const { return N * C * S; }
};

// The checked operands of a forward: the view, the residual in the input's format (undefined
// when not given), the activation.
struct FwdOperands {
  View g;
  at::Tensor residual;
  Activation act;
};

// The checked operands of a backward: grad_out in the input's format; out in it where the
// backward reads out, the residual where it recomputes z and one was given (else undefined);
// the activation.
struct BwdOperands {
  View g;
  at::Tensor grad_out;
  at::Tensor out;
  at::Tensor residual;
  Activation act;
};

// The length of the act_mask a backend's bn_act_fwd_train returns for an input.
// keeps_mask: the activation is piecewise linear (backward_reads_out), the only kind whose
// backward a mask can stand in for out.
using ActMaskBytes = int64_t (*)(const View&, bool keeps_mask);

// The activation named `act`, a name the contract has accepted.
Act act_of(c10::string_view act);

// One function per op: checks every argument, then lays the activations out.
FwdOperands bn_act_operands(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool training, double eps, c10::string_view act, double negative_slope);
FwdOperands fwd_train_operands(
    const at::Tensor& input, const OptTensor& residual, const OptTensor& weight,
    const OptTensor& bias, double eps, c10::string_view act, double negative_slope);
FwdOperands fwd_eval_operands(
    const at::Tensor& input, const OptTensor& residual, const at::Tensor& running_mean,
    const at::Tensor& running_var, const OptTensor& weight, const OptTensor& bias, double eps,
    c10::string_view act, double negative_slope);
BwdOperands bwd_operands(
    const at::Tensor& grad_out, const OptTensor& out, const at::Tensor& act_mask,
    const at::Tensor& input, const OptTensor& weight, const at::Tensor& mean,
    const at::Tensor& invstd, ActMaskBytes act_mask_bytes, const OptTensor& residual,
    const OptTensor& bias, c10::string_view act, double negative_slope);
View stats_operands(const at::Tensor& input);
BwdOperands bwd_reduce_operands(
    const at::Tensor& grad_out, const OptTensor& out, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& invstd, const OptTensor& residual,
    const OptTensor& weight, const OptTensor& bias, c10::string_view act, double negative_slope);
BwdOperands bwd_apply_operands(
    const at::Tensor& grad_out, const OptTensor& out, const at::Tensor& input,
    const OptTensor& weight, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& mean_dz, const at::Tensor& mean_dz_xhat, const OptTensor& residual,
    const OptTensor& bias, c10::string_view act, double negative_slope);

} // namespace fused_resnet
