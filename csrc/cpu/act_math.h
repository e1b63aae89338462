// The activations (common/activation.h; the table is docs/design.md's "Activations") on values
// of the accumulation type, as Vectorized<A> and as scalars: the forward out = act(z) and the
// derivative dz = dy·act'(.), by the formulas of aten's CPU kernels (relu, hardtanh, leaky_relu,
// silu, hardswish, gelu and their backward kernels). Double evaluates exp, erf and tanh as eager
// does (at::vec: Sleef); float's vectors take every exp from at::vec's faster exp_u20 (fast_exp),
// erf by at::vec's own float formula around it and tanh from it (fast_tanh): the transcendental
// activations are compute-bound on a CPU, and these stay within 3e-7 of float64 (the scalar path,
// span heads and tails, evaluates std::exp, std::erf and std::tanh).
//
// ActFn<kAct, A> is a compile-time constant of the kernels (dispatch_act turns the op's act into
// it), so that every kernel is compiled once per activation and the ReLU kernels are exactly the
// code they were before the activation became an argument. Its one runtime value is leaky_relu's
// slope.
#pragma once

#include "common/activation.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace fused_resnet::cpu {

template <Act kAct, typename A>
struct ActFn {
  using AV = at::vec::Vectorized<A>;
  // Where the backward finds act'(.): out's side of the kink (piecewise linear: out, or the
  // mask bits that stand in for it), or z recomputed (smooth); identity needs neither.
  static constexpr bool kReadsOut = backward_reads_out(kAct);
  static constexpr bool kRecomputesZ = backward_recomputes_z(kAct);
  // The derivative evaluates exp, erf or tanh: dearer than writing dz and reading it back
  // (bwd.cpp's kReduceKeepsDz); hardswish's is a few compares and an FMA.
  static constexpr bool kTranscendentalGrad =
      kAct == Act::kSilu || kAct == Act::kGelu || kAct == Act::kGeluTanh;

  A slope;  // leaky_relu's negative_slope (>= 0, the contract checks it), in A as eager's kernel

  explicit ActFn(double negative_slope) : slope(static_cast<A>(negative_slope)) {}

  // -------------------------------------------------------------------------------------------
  // out = act(z). relu, relu6 and leaky_relu keep a NaN z, as eager does (max_ps(0, z) returns
  // its second operand when either is NaN: clamp_min and clamp compile to that).

  C10_ALWAYS_INLINE AV forward(const AV& z) const {
    if constexpr (kAct == Act::kRelu) {
      return at::vec::clamp_min(z, AV(A(0)));
    } else if constexpr (kAct == Act::kRelu6) {  // hardtanh(z, 0, 6)
      return at::vec::clamp(z, AV(A(0)), AV(A(6)));
    } else if constexpr (kAct == Act::kLeakyRelu) {
      return AV::blendv(z * AV(slope), z, z > AV(A(0)));
    } else if constexpr (kAct == Act::kIdentity) {
      return z;
    } else if constexpr (kAct == Act::kSilu) {  // z / (1 + exp(−z))
      return z / (AV(A(1)) + fast_exp(z.neg()));
    } else if constexpr (kAct == Act::kHardswish) {  // z·min(max(z + 3, 0), 6)/6
      return z * at::vec::minimum(at::vec::maximum(z + AV(A(3)), AV(A(0))), AV(A(6))) / AV(A(6));
    } else if constexpr (kAct == Act::kGelu) {  // z·½·(1 + erf(z/√2))
      AV e;
      return z * AV(A(0.5)) * (AV(A(1)) + erf_with_exp(z * AV(A(kSqrtHalf)), e));
    } else {  // kGeluTanh: ½·z·(1 + tanh(√(2/π)·(z + 0.044715·z³)))
      const AV inner = AV(A(kSqrt2OverPi)) * (z + AV(A(kKappa)) * (z * z * z));
      return AV(A(0.5)) * z * (AV(A(1)) + fast_tanh(inner));
    }
  }

  C10_ALWAYS_INLINE A forward(A z) const {
    if constexpr (kAct == Act::kRelu) {
      return z <= A(0) ? A(0) : z;  // NaN <= 0 is false: NaN passes
    } else if constexpr (kAct == Act::kRelu6) {
      return z <= A(0) ? A(0) : (z >= A(6) ? A(6) : z);
    } else if constexpr (kAct == Act::kLeakyRelu) {
      return z > A(0) ? z : z * slope;
    } else if constexpr (kAct == Act::kIdentity) {
      return z;
    } else if constexpr (kAct == Act::kSilu) {
      return z / (A(1) + std::exp(-z));
    } else if constexpr (kAct == Act::kHardswish) {
      return z * std::min(std::max(z + A(3), A(0)), A(6)) / A(6);
    } else if constexpr (kAct == Act::kGelu) {
      return z * A(0.5) * (A(1) + std::erf(z * A(kSqrtHalf)));
    } else {
      const A inner = A(kSqrt2OverPi) * (z + A(kKappa) * (z * z * z));
      return A(0.5) * z * (A(1) + std::tanh(inner));
    }
  }

  // -------------------------------------------------------------------------------------------
  // Piecewise linear (kReadsOut): the side of the kink, from out as stored (what eager's backward
  // compares), as lanes all ones ("off": the derivative is not 1) or all zeros; the mask bits
  // (act_mask.h) record exactly these lanes. A NaN out is off where eager's backward does not
  // pass dy for it:
  //   relu        off: out <= 0             dz = 0 there   (threshold_backward; NaN passes dy)
  //   relu6       off: out <= 0 or out >= 6 dz = 0 there   (hardtanh_backward; NaN passes dy)
  //   leaky_relu  off: not out > 0          dz = dy·slope  (leaky_relu_backward; NaN: dy·slope)

  C10_ALWAYS_INLINE AV off(const AV& y) const {
    static_assert(kReadsOut, "only the piecewise-linear activations have a side");
    const AV zero(A(0));
    if constexpr (kAct == Act::kRelu) {
      return y <= zero;
    } else if constexpr (kAct == Act::kRelu6) {
      return (y <= zero) | (y >= AV(A(6)));
    } else {
      return (y <= zero) | y.isnan();
    }
  }

  C10_ALWAYS_INLINE bool off(A y) const {
    static_assert(kReadsOut, "only the piecewise-linear activations have a side");
    if constexpr (kAct == Act::kRelu) {
      return y <= A(0);
    } else if constexpr (kAct == Act::kRelu6) {
      return y <= A(0) || y >= A(6);
    } else {
      return !(y > A(0));
    }
  }

  // dz from dy and the off lanes.
  C10_ALWAYS_INLINE AV grad_off(const AV& dy, const AV& off) const {
    if constexpr (kAct == Act::kLeakyRelu) {
      return AV::blendv(dy, dy * AV(slope), off);
    } else {
      return AV::blendv(dy, AV(A(0)), off);
    }
  }

  C10_ALWAYS_INLINE A grad_off(A dy, bool off) const {
    if constexpr (kAct == Act::kLeakyRelu) {
      return off ? dy * slope : dy;
    } else {
      return off ? A(0) : dy;
    }
  }

  // -------------------------------------------------------------------------------------------
  // Smooth (kRecomputesZ): dz = dy·act'(z), as aten's backward kernels.
  //   silu       σ = 1/(1 + exp(−z)),  dy·σ·(1 + z·(1 − σ))
  //   hardswish  0 up to −3 inclusive, dy·(z/3 + ½) strictly between, dy from 3 on (the
  //              bounds of the installed torch's hardswish_backward: z = ±3 gives 0 and dy; a
  //              NaN z gives NaN, as its vector path)
  //   gelu       dy·(Φ(z) + z·φ(z)),  Φ(z) = ½·(1 + erf(z/√2)),  φ(z) = exp(−z²/2)/√(2π)
  //   gelu_tanh  t = tanh(k·(z + κ·z³)), k = √(2/π), κ = 0.044715:
  //              dy·(½·(1 + t) + ½·z·(1 − t²)·k·(1 + 3κ·z²))

  C10_ALWAYS_INLINE AV grad_z(const AV& dy, const AV& z) const {
    static_assert(kRecomputesZ, "only the smooth activations read z");
    const AV one(A(1));
    if constexpr (kAct == Act::kSilu) {
      const AV sigmoid = one / (one + fast_exp(z.neg()));
      return dy * sigmoid * (one + z * (one - sigmoid));
    } else if constexpr (kAct == Act::kHardswish) {
      const AV three(A(3));
      const AV inner = AV::blendv(dy * (z / three + AV(A(0.5))), dy, z >= three);
      return AV::blendv(inner, AV(A(0)), z <= AV(A(-3)));
    } else if constexpr (kAct == Act::kGelu) {
      AV cdf, pdf;
      gelu_cdf_pdf(z, cdf, pdf);
      return dy * (cdf + z * pdf);
    } else {
      const AV half(A(0.5));
      const AV k = AV(A(kSqrt2OverPi));
      const AV kappa = AV(A(kKappa));
      const AV z_sq = z * z;
      const AV t = fast_tanh(k * (z + kappa * (z_sq * z)));
      const AV left = half * z;
      const AV left_derivative = half * (one + t);
      const AV tanh_derivative = one - t * t;
      const AV inner_derivative = k * (one + AV(A(3)) * kappa * z_sq);
      return dy * (left_derivative + left * tanh_derivative * inner_derivative);
    }
  }

  C10_ALWAYS_INLINE A grad_z(A dy, A z) const {
    static_assert(kRecomputesZ, "only the smooth activations read z");
    if constexpr (kAct == Act::kSilu) {
      const A sigmoid = A(1) / (A(1) + std::exp(-z));
      return dy * sigmoid * (A(1) + z * (A(1) - sigmoid));
    } else if constexpr (kAct == Act::kHardswish) {
      if (z >= A(3)) {
        return dy;
      }
      return z <= A(-3) ? A(0) : dy * (z / A(3) + A(0.5));
    } else if constexpr (kAct == Act::kGelu) {
      const A cdf = A(0.5) * (A(1) + std::erf(z * A(kSqrtHalf)));
      const A pdf = A(kInvSqrt2Pi) * std::exp(z * z * A(-0.5));
      return dy * (cdf + z * pdf);
    } else {
      const A z_sq = z * z;
      const A t = std::tanh(A(kSqrt2OverPi) * (z + A(kKappa) * (z_sq * z)));
      const A inner_derivative = A(kSqrt2OverPi) * (A(1) + A(3) * A(kKappa) * z_sq);
      return dy * (A(0.5) * (A(1) + t) + A(0.5) * z * (A(1) - t * t) * inner_derivative);
    }
  }

 private:
  // exp(v): at::vec's exp_u20 for float (a degree-5 polynomial after the range reduction, at
  // most 20 ULP of exp), Sleef's exp for double. Over z in [−20, 20] SiLU stays within 1.0e-7 of
  // float64 and its derivative within 9.8e-7 (relative to max(1, |value|)), the same as with
  // Sleef's 1-ULP exp. With Sleef's, SiLU made the kernels compute-bound: 0.50 ns an element for
  // the forward on one AVX2 core against 0.32 with exp_u20 (the derivative 0.69 against 0.47).
  static C10_ALWAYS_INLINE AV fast_exp(const AV& v) {
    if constexpr (std::is_same_v<A, float>) {
      return v.exp_u20();
    } else {
      return v.exp();
    }
  }

  // tanh(v) = (e − 1)/(e + 1), e = exp(2v), for float (within 1.5e-7 of float64 in gelu_tanh),
  // 2v clamped to [−18, 18] first (float's tanh is ±1 beyond |v| = 9; exp_u20 is inf from 88.7
  // on, and inf/inf would be NaN; clamp keeps a NaN, whose exp_u20 is inf: NaN out); at::vec's
  // (Sleef's) for double. One AVX2 core: gelu_tanh's forward 0.47 ns an element against 2.17
  // with Sleef's float tanh.
  static C10_ALWAYS_INLINE AV fast_tanh(const AV& v) {
    if constexpr (std::is_same_v<A, float>) {
      const AV one(A(1));
      const AV e = fast_exp(at::vec::clamp(v + v, AV(A(-18)), AV(A(18))));
      return (e - one) / (e + one);
    } else {
      return v.tanh();
    }
  }

  // erf(x), and in e the exp(−x²) it is built from (float; double: at::vec's erf, e not set).
  // Float: the formula of at::vec's AVX2/AVX512 float erf, op for op (Abramowitz-Stegun 7.1.26:
  // erf(x) = sign(x)·(1 − t·r(t)·exp(−x²)), t = 1/(1 + p·|x|), r a quartic; absolute error
  // 1.5e-7) around fast_exp in place of Sleef's exp: gelu's forward 0.66 -> 0.53 ns an element
  // on one AVX2 core, within 2.6e-7 of float64.
  static C10_ALWAYS_INLINE AV erf_with_exp(const AV& x, AV& e) {
    if constexpr (std::is_same_v<A, float>) {
      const AV one(A(1));
      const AV sign = x & AV(-0.f);
      const AV abs_x = x ^ sign;
      const AV t = one / at::vec::fmadd(AV(0.3275911f), abs_x, one);
      AV r = at::vec::fmadd(AV(1.061405429f), t, AV(-1.453152027f));
      r = at::vec::fmadd(r, t, AV(1.421413741f));
      r = at::vec::fmadd(r, t, AV(-0.284496736f));
      r = at::vec::fmadd(r, t, AV(0.254829592f));
      e = fast_exp((x * x).neg());
      return at::vec::fmadd(e.neg() * t, r, one) ^ sign;
    } else {
      return x.erf();
    }
  }

  // Φ(z) = ½·(1 + erf(z/√2)) and φ(z) = exp(−z²/2)/√(2π), gelu's derivative's two halves. For
  // float, erf's exp(−x²) at x = z/√2 is φ's exp(−z²/2): one exp an element instead of two.
  // Double: at::vec's erf and exp (Sleef's), as eager's gelu_backward.
  static C10_ALWAYS_INLINE void gelu_cdf_pdf(const AV& z, AV& cdf, AV& pdf) {
    const AV x = z * AV(A(kSqrtHalf));
    AV e;
    cdf = AV(A(0.5)) * (AV(A(1)) + erf_with_exp(x, e));
    if constexpr (!std::is_same_v<A, float>) {
      e = (z * z * AV(A(-0.5))).exp();
    }
    pdf = AV(A(kInvSqrt2Pi)) * e;
  }

  // Double constants, rounded once to A (as eager's kernels round theirs).
  static constexpr double kSqrtHalf = 0.7071067811865476;     // 1/√2
  static constexpr double kInvSqrt2Pi = 0.3989422804014327;   // 1/√(2π)
  static constexpr double kSqrt2OverPi = 0.7978845608028654;  // √(2/π)
  static constexpr double kKappa = 0.044715;
};

} // namespace fused_resnet::cpu
