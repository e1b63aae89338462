// The activations on the device (common/activation.h names them; docs/design.md, "Activations",
// has the table): out = act(z) for the forward apply, dz = dy·act'(.) for both backward passes,
// each specialized at compile time on Act (a template parameter of the ops, from dispatch_act on
// the host). All math is in the accumulation type A (float for half, bfloat16 and float, double
// for double), with the formulas of aten's CUDA kernels (hardswish divides by 6, as the design's
// table and the Triton kernel, where aten multiplies by 1/6 rounded), which the reference backend
// runs on CUDA tensors:
//   forward   relu, relu6 (hardtanh(0, 6)), leaky_relu: NaN kept, as eager; silu x/(1 + e^-x);
//             hardswish; gelu 0.5·z·(1 + erf(z/√2)); gelu_tanh 0.5·z·(1 + tanh(k·(z + κ·z³)))
//   backward  relu, relu6, leaky_relu from out (threshold_backward, hardtanh_backward,
//             leaky_relu_backward: a NaN out passes dy, resp. dy·negative_slope); identity dy;
//             silu, hardswish, gelu, gelu_tanh from z recomputed by the caller (silu_backward,
//             hardswish_backward, gelu_backward with either approximation).
#pragma once

#include "common/activation.h"

#include <cuda_runtime_api.h>

#include <cmath>
#include <type_traits>

namespace fused_resnet::cuda {

// ---------------------------------------------------------------------------------------------
// Transcendental functions of the accumulation type: the single-precision ones for float (never
// promoted to double by an overload picked by accident), the double ones for double.

__device__ __forceinline__ float act_exp(float v) {
  return expf(v);
}
__device__ __forceinline__ double act_exp(double v) {
  return ::exp(v);
}
__device__ __forceinline__ float act_erf(float v) {
  return erff(v);
}
__device__ __forceinline__ double act_erf(double v) {
  return ::erf(v);
}
__device__ __forceinline__ float act_tanh(float v) {
  return tanhf(v);
}
__device__ __forceinline__ double act_tanh(double v) {
  return ::tanh(v);
}

// The constants of the gelus, in the accumulation type (exact to its precision, as aten's
// opmath constants): 1/√2, 1/√(2π) = φ(0), and √(2/π) and κ of the tanh approximation.
template <typename A>
struct GeluConstants {
  static constexpr A kSqrtHalf = A(0.70710678118654752440);   // M_SQRT1_2
  static constexpr A kInvSqrt2Pi = A(0.39894228040143267794);  // M_2_SQRTPI·M_SQRT1_2·0.5
  static constexpr A kSqrt2OverPi = A(0.79788456080286535588); // M_SQRT2·M_2_SQRTPI·0.5
  static constexpr A kKappa = A(0.044715);
};

// ---------------------------------------------------------------------------------------------
// out = act(z). negative_slope is read by kLeakyRelu only.
template <Act kAct, typename A>
__device__ __forceinline__ A activation(A z, A negative_slope) {
  using K = GeluConstants<A>;
  if constexpr (kAct == Act::kRelu) {
    return z <= A(0) ? A(0) : z;  // NaN <= 0 is false: NaN passes
  } else if constexpr (kAct == Act::kRelu6) {
    return z <= A(0) ? A(0) : (z >= A(6) ? A(6) : z);  // NaN passes both tests
  } else if constexpr (kAct == Act::kLeakyRelu) {
    return z > A(0) ? z : z * negative_slope;  // NaN: NaN·slope, NaN
  } else if constexpr (kAct == Act::kIdentity) {
    return z;
  } else if constexpr (kAct == Act::kSilu) {
    return z / (A(1) + act_exp(-z));
  } else if constexpr (kAct == Act::kHardswish) {
    const A t = z + A(3);
    const A clamped = t < A(0) ? A(0) : (t > A(6) ? A(6) : t);
    return z * clamped / A(6);
  } else if constexpr (kAct == Act::kGelu) {
    return z * A(0.5) * (A(1) + act_erf(z * K::kSqrtHalf));
  } else {
    static_assert(kAct == Act::kGeluTanh, "an Act without a device formula");
    const A inner = K::kSqrt2OverPi * (z + K::kKappa * (z * z * z));
    return A(0.5) * z * (A(1) + act_tanh(inner));
  }
}

// dz = dy·act'(.), from out (relu, relu6, leaky_relu) or z (silu, hardswish, gelu, gelu_tanh);
// the argument the activation does not read is ignored (callers pass 0 and need not load it).
template <Act kAct, typename A>
__device__ __forceinline__ A activation_grad(A dy, A out, A z, A negative_slope) {
  using K = GeluConstants<A>;
  if constexpr (kAct == Act::kRelu) {  // threshold_backward: 0 where out <= 0
    return out <= A(0) ? A(0) : dy;
  } else if constexpr (kAct == Act::kRelu6) {  // hardtanh_backward(0, 6)
    return (out <= A(0) || out >= A(6)) ? A(0) : dy;
  } else if constexpr (kAct == Act::kLeakyRelu) {  // out > 0 exactly where z > 0 (slope >= 0)
    return out > A(0) ? dy : dy * negative_slope;
  } else if constexpr (kAct == Act::kIdentity) {
    return dy;
  } else if constexpr (kAct == Act::kSilu) {  // σ(z)·(1 + z·(1 − σ(z)))
    const A sigmoid = A(1) / (A(1) + act_exp(-z));
    return dy * sigmoid * (A(1) + z * (A(1) - sigmoid));
  } else if constexpr (kAct == Act::kHardswish) {  // 0 below −3, z/3 + 1/2 up to 3, 1 above
    return z < A(-3) ? A(0) : (z <= A(3) ? dy * (z / A(3) + A(0.5)) : dy);  // NaN z: dy
  } else if constexpr (kAct == Act::kGelu) {  // Φ(z) + z·φ(z)
    const A cdf = A(0.5) * (A(1) + act_erf(z * K::kSqrtHalf));
    const A pdf = act_exp(A(-0.5) * z * z) * K::kInvSqrt2Pi;
    return dy * (cdf + z * pdf);
  } else {
    static_assert(kAct == Act::kGeluTanh, "an Act without a device formula");
    const A z_sq = z * z;
    const A inner = K::kSqrt2OverPi * (z + K::kKappa * z_sq * z);
    const A t = act_tanh(inner);
    const A left = A(0.5) * z;
    const A right = A(1) + t;
    const A left_derivative = A(0.5) * right;
    const A inner_derivative = K::kSqrt2OverPi * (A(1) + A(3) * K::kKappa * z_sq);
    const A right_derivative = left * (A(1) - t * t) * inner_derivative;
    return dy * (left_derivative + right_derivative);
  }
}

// ---------------------------------------------------------------------------------------------
// The backward launchers' dispatch: calls f(std::integral_constant<Act, kAct>{},
// std::bool_constant<kResidual>{}) for the runtime activation, kResidual = has_residual where the
// backward recomputes z (the only use a backward pass has for the residual), false elsewhere, so
// that no kernel is instantiated for a residual it never reads.
template <typename F>
void dispatch_bwd_act(Act act, bool has_residual, const F& f) {
  dispatch_act(act, [&](auto kind) {
    constexpr Act kAct = decltype(kind)::value;
    if constexpr (backward_recomputes_z(kAct)) {
      if (has_residual) {
        f(kind, std::true_type{});
      } else {
        f(kind, std::false_type{});
      }
    } else {
      f(kind, std::false_type{});
    }
  });
}

} // namespace fused_resnet::cuda
