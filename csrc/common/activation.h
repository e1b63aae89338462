// The activation an op applies after the BatchNorm (and the add): out = act(z),
// z = x̂·w + b (+ r). The table, and what each backward reads, are in docs/design.md
// ("Activations"); fused_resnet/contract.py holds the same list in the same order.
#pragma once

#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <string>
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
// constant, as dispatch_bool (cpu/host.h) does for a flag.
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

// The profiler name of a fused forward or backward, as fused_resnet/trace_names.py writes it:
// "fused_resnet::bn_<act>_fwd", "fused_resnet::bn_add_<act>_bwd", ...
inline const char* trace_name(Act kind, bool has_residual, bool forward) {
  static const std::array<std::string, 32> names = [] {
    constexpr const char* acts[] = {"relu", "relu6", "leaky_relu", "identity",
                                    "silu", "hardswish", "gelu", "gelu_tanh"};
    std::array<std::string, 32> n;
    for (int a = 0; a < 8; ++a) {
      for (int r = 0; r < 2; ++r) {
        for (int f = 0; f < 2; ++f) {
          n[a * 4 + r * 2 + f] = std::string("fused_resnet::bn_") + (r ? "add_" : "") + acts[a] +
              (f ? "_fwd" : "_bwd");
        }
      }
    }
    return n;
  }();
  return names[static_cast<int>(kind) * 4 + (has_residual ? 2 : 0) + (forward ? 1 : 0)].c_str();
}

} // namespace fused_resnet
