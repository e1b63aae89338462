// The CPU form of bn_act_fwd_train's act_mask: for the piecewise-linear activations
// (backward_reads_out), in the rows layout, the training forward keeps one bit per element of
// the side of out where the derivative is not 1 (ActFn::off), which bn_act_bwd reads instead of
// out.
#pragma once

#include "common/contract.h"
#include "plans.h"
#include "vec.h"

#include <cstdint>
#include <type_traits>

namespace fused_resnet::cpu {

// Activation masks packed as bits: bit e % 8 of byte e / 8 is set where out[e] is on the side
// where the derivative is not 1 (ActFn::off: relu out <= 0, dz = 0; relu6 out <= 0 or out >= 6,
// dz = 0; leaky_relu not out > 0, dz = dy·slope), e the element's index in memory order. This is
// the CPU form of bn_act_fwd_train's act_mask, and what bn_act_bwd records for itself when it
// gets none (bwd_rows.h, RowMask). A byte holds the 8 float lanes of one Vectorized<float>:
// lane_bits packs ActFn::off's result (lanes all ones or all zeros), lanes_from_bits expands a
// byte back into one, for ActFn::grad_off. Built with AVX2 only (kHaveMaskBits); other builds
// read out instead.
using MaskWord = uint8_t;
#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kHaveMaskBits = true;
C10_ALWAYS_INLINE MaskWord lane_bits(const at::vec::Vectorized<float>& m) {
  return static_cast<MaskWord>(_mm256_movemask_ps(__m256(m)));
}
C10_ALWAYS_INLINE at::vec::Vectorized<float> lanes_from_bits(MaskWord bits) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i v = _mm256_and_si256(_mm256_set1_epi32(bits), lane_bit);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(v, lane_bit));
}
#else
constexpr bool kHaveMaskBits = false;
C10_ALWAYS_INLINE MaskWord lane_bits(const at::vec::Vectorized<float>&) {
  return 0;  // never called: no mask is kept without kHaveMaskBits
}
C10_ALWAYS_INLINE at::vec::Vectorized<float> lanes_from_bits(MaskWord) {
  return at::vec::Vectorized<float>();
}
#endif

// Bytes of a mask of numel elements (the size of act_mask for a rows-layout input).
inline int64_t act_mask_bytes(int64_t numel) {
  return (numel + 7) / 8;
}

// The length of the act_mask bn_act_fwd_train returns for an input: a bit per element in the
// rows layout for an activation that keeps one (keeps_mask: backward_reads_out), none in the
// planes layout (bn_act_bwd reads out there) or for the others (identity reads neither, the
// smooth ones recompute z).
inline int64_t cpu_act_mask_bytes(const View& g, bool keeps_mask) {
  return keeps_mask && g.rows ? act_mask_bytes(g.numel()) : 0;
}

// Whether the rows-layout kernels of activation Fn keep the mask of this plan: a piecewise-linear
// activation, and every element of the super-rows then lies in a whole vector of float lanes
// (W a multiple of the step, T computed in float), so each vector's bits fill one byte (two for
// Half/BFloat16) and chunks start on a byte. kMaskable: the kernels that may keep one (the only
// ones compiled with the mask).
template <typename T, typename Fn>
constexpr bool kMaskable = Fn::kReadsOut && std::is_same_v<acc_type<T>, float>;
template <typename T, typename Fn>
C10_ALWAYS_INLINE bool rows_keep_mask(const RowPlan& plan) {
  return kHaveMaskBits && kMaskable<T, Fn> && plan.W % VecT<T>::kStep == 0;
}

// Sets the mask bits of elements [j0, j1) of a span whose element 0 starts a mask byte, from
// their outputs, one at a time (the tails that no whole vector covers). A byte is cleared when
// its first element is reached, so j0 must start a byte or follow bits already set here.
template <typename T, typename Fn>
C10_ALWAYS_INLINE void set_mask_bits(
    MaskWord* mask, const T* y, int64_t j0, int64_t j1, const Fn& act) {
  for (int64_t j = j0; j < j1; ++j) {
    if ((j & 7) == 0) {
      mask[j >> 3] = 0;
    }
    const bool off = act.off(static_cast<acc_type<T>>(y[j]));
    mask[j >> 3] |= static_cast<MaskWord>(off) << (j & 7);
  }
}

} // namespace fused_resnet::cpu
