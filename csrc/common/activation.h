// The activation an op applies after the BatchNorm (and the add): out = act(z),
// z = x̂·w + b (+ r). The table, and what each backward reads, are in docs/design.md
// ("Activations"); fused_resnet/contract.py holds the same list in the same order.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

namespace fused_resnet {

// In contract.ACTIVATIONS' order (the Triton kernels' ACT codes are these indices too).
enum class Act : int8_t {
  kRelu,        // max(z, 0)
  kRelu6,       // min(max(z, 0), 6)
  kLeakyRelu,   // z > 0 ? z : negative_slope·z, negative_slope >= 0
  kIdentity,    // z
  kSilu,        // z·σ(z)
  kHardswish,   // z·min(max(z + 3, 0), 6)/6
  kGelu,        // z·Φ(z)
  kGeluTanh,    // 0.5·z·(1 + tanh(√(2/π)·(z + 0.044715·z³)))
};

struct Activation {
  Act kind = Act::kRelu;
  double negative_slope = 0.01;  // read by kLeakyRelu only
};

// The piecewise-linear activations: the backward tells the side of the kink from out (out > 0
// for relu and leaky_relu, 0 < out < 6 for relu6), or from the mask that stands in for out.
constexpr bool backward_reads_out(Act a) {
  return a == Act::kRelu || a == Act::kRelu6 || a == Act::kLeakyRelu;
}

// The smooth activations: the backward recomputes z from x, the statistics, w, b and r.
constexpr bool backward_recomputes_z(Act a) {
  return a == Act::kSilu || a == Act::kHardswish || a == Act::kGelu || a == Act::kGeluTanh;
}

// Calls f(std::integral_constant<Act, kind>{}): turns the runtime activation into a template
// constant, as dispatch_bools does for flags.
template <typename F>
decltype(auto) dispatch_act(Act kind, F&& f) {
  switch (kind) {
    case Act::kRelu: return f(std::integral_constant<Act, Act::kRelu>{});
    case Act::kRelu6: return f(std::integral_constant<Act, Act::kRelu6>{});
    case Act::kLeakyRelu: return f(std::integral_constant<Act, Act::kLeakyRelu>{});
    case Act::kIdentity: return f(std::integral_constant<Act, Act::kIdentity>{});
    case Act::kSilu: return f(std::integral_constant<Act, Act::kSilu>{});
    case Act::kHardswish: return f(std::integral_constant<Act, Act::kHardswish>{});
    case Act::kGelu: return f(std::integral_constant<Act, Act::kGelu>{});
    case Act::kGeluTanh: return f(std::integral_constant<Act, Act::kGeluTanh>{});
  }
  TORCH_CHECK(false, "fused_resnet: unknown activation ", static_cast<int>(kind));
}

} // namespace fused_resnet
