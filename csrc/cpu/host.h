// The CPU backend's host side: its implementation of the ops (register.cpp registers them,
// composed by common/device_ops.h), and what the host code of the kernels shares
// (host.cpp): outputs, the streaming-store policy, per-channel parameter reads. The math of every
// op is stated in csrc/fused_resnet.cpp, the layouts and checks in csrc/common/contract.h.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/device_ops.h"
#include "common/contract.h"

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

namespace fused_resnet::cpu {

// ---------------------------------------------------------------------------------------------
// The CPU implementation of the ops, on checked operands (common/device_ops.h composes the
// registered ops from them; register.cpp registers them): the forwards in fwd.cpp, the backward
// in bwd.cpp, SyncBatchNorm's pieces of it in bwd_pieces.cpp (bwd_host.h: their shared host
// side). Each reads the activation from its operands (in.act) and runs the kernels compiled for
// it (act_math.h); the backward ops read weight, bias (and in.residual) only to recompute z for
// a smooth activation, beside weight's part in dx.

TrainOutputs fwd_train_cpu(
    const FwdOperands& in, const OptTensor& weight, const OptTensor& bias, double eps,
    const RunningBuffers* running);
at::Tensor fwd_eval_cpu(
    const FwdOperands& in, const at::Tensor& running_mean, const at::Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, double eps);
BwdOutputs bwd_cpu(
    const BwdOperands& in, const at::Tensor& act_mask, const OptTensor& weight,
    const OptTensor& bias, const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats,
    bool residual_grad);
TensorPair stats_cpu(const View& g);
TensorPair bwd_reduce_cpu(
    const BwdOperands& in, const OptTensor& weight, const OptTensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd);
TensorPair bwd_apply_cpu(
    const BwdOperands& in, const OptTensor& weight, const OptTensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& mean_dz,
    const at::Tensor& mean_dz_xhat, bool residual_grad);

// ---------------------------------------------------------------------------------------------
// Host-side helpers (host.cpp).

// Allocates an activation output laid out like the canonical input (fully written later).
at::Tensor empty_activation(const View& g);

// Converts a per-channel vector (checked by the op contract) to acc_t (any stride); a missing optional
// gives `fill`.
template <typename acc_t>
void read_param(const std::optional<at::Tensor>& t, int64_t C, acc_t fill, acc_t* dst);

// Whether an op touching `bytes` of activations (all inputs and outputs) should stream its
// outputs: when they would not stay in the last-level cache anyway, and in the two-pass
// training ops already from a smaller size (the thresholds and their measurements are in
// host.cpp).
enum class Pass { kOne, kTwo };  // inputs read once (eval) or twice (training forward, backward)
bool use_streaming_stores(int64_t bytes, Pass passes);

// Calls f(std::bool_constant<a>{}): a runtime flag to a template constant.
template <typename F>
C10_ALWAYS_INLINE void dispatch_bool(bool a, const F& f) {
  a ? f(std::true_type{}) : f(std::false_type{});
}

} // namespace fused_resnet::cpu
