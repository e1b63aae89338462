// Shared pieces of the CPU kernels of fused_resnet (bn_act_fwd.cpp, bn_act_bwd.cpp,
// bn_act_common.cpp, bn_act_register.cpp). The math of every op is stated in
// csrc/fused_resnet.cpp; this header holds what the kernels have in common:
//
//   * Geometry (csrc/common/contract.h): the input viewed as planes [N][C][S] (contiguous
//     NC*) or rows [N*S][C] (channels_last, or S == 1); other activations are brought to the
//     input's format, so a single linear index addresses all of them.
//   * VecT<T>: load/store of T as Vectorized<acc_t> (acc_t = double for double, else float).
//     Half/BFloat16 load one Vectorized<T> (16 lanes) as two Vectorized<float>.
//   * Moments: (count, mean, M2) partials merged with Chan's formula.
//   * Row "super-rows": in the rows layout, k consecutive rows (W = k*C elements) are handled
//     as one period so that W is a multiple of the vector width even when C is not (C = 3,
//     19, ...): per-position parameters are expanded to W entries, position j is channel j % C.
//   * ReLU mask bits: the rows layout's training forward keeps 1 bit per element of out <= 0,
//     which bn_act_bwd reads instead of out (MaskWord, rows_keep_mask).
//   * Memory: large outputs are written with streaming stores (use_streaming_stores) and get
//     transparent huge pages (empty_activation); both are described where they are defined.
//
// Vectorization: setup.py compiles with -mavx2 -mfma -DCPU_CAPABILITY_AVX2 when the build
// machine has AVX2+FMA, which selects the 256-bit at::vec implementation (checked below); any
// other build uses at::vec's portable fallback and still computes the same results.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "common/bn_act_module.h"
#include "common/contract.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2)
static_assert(
    at::vec::Vectorized<float>::size() == 8,
    "CPU_CAPABILITY_AVX2 should select at::vec's 256-bit implementation");
#endif

namespace fused_resnet::cpu {

// ---------------------------------------------------------------------------------------------
// Host functions (registered in bn_act_register.cpp).

// The device's forwards on checked operands (bn_act_fwd.cpp), from which bn_act_module.cpp
// composes bn_act, bn_act_fwd_train and bn_act_fwd_eval.
extern const BnActDevice kCpuForwards;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& out,
    const at::Tensor& relu_mask,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    bool batch_stats,
    bool residual_grad);

// The pieces of the training ops for SyncBatchNorm (statistics spanning several processes).
std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& input);

std::tuple<at::Tensor, at::Tensor> bn_act_bwd_reduce_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& out,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& invstd);

std::tuple<at::Tensor, at::Tensor> bn_act_bwd_apply_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& mean_dz,
    const at::Tensor& mean_dz_xhat,
    bool residual_grad);

// ---------------------------------------------------------------------------------------------
// Host-side helpers (bn_act_common.cpp).

// Allocates an activation output laid out like the canonical input (fully written later).
at::Tensor empty_activation(const Geometry& g);

// Converts a per-channel vector (checked by the op contract) to acc_t (any stride); a missing optional
// gives `fill`.
template <typename acc_t>
void read_param(const std::optional<at::Tensor>& t, int64_t C, acc_t fill, acc_t* dst);

// ---------------------------------------------------------------------------------------------
// Tuning constants.

// Below this many elements an op runs on the calling thread (an OpenMP fork costs ~µs).
constexpr int64_t kParallelMinElems = 32768;
// A stats block: the two-pass (sum, then centred squares) over one block reads it from L1.
constexpr int64_t kBlockBytes = 16384;
// A task of the split (small-C) planes path covers at least this many elements.
constexpr int64_t kMinTaskElems = 16384;
// Rows layout: accumulators of a register tile (Vectorized<acc> per sum), and rows per block
// (a tile's column slice of a block stays in L1 between the two passes of the statistics).
// A tile spans 8 vectors (256 bytes of fp32, a whole row at C = 64) so that it reads each row
// in runs of 4 cache lines: with 4 vectors (2 lines per row at a stride of the row) the
// hardware prefetchers fell behind, and the cold statistics and backward-reduce passes of
// (8,64,56,56) channels_last fp32 took 1.3-1.5x as long (2-core EPYC VM, session 4).
constexpr int64_t kTileVectors = 8;
constexpr int64_t kRowBlock = 64;
// Largest super-row used to make the rows period a multiple of the vector width.
constexpr int64_t kMaxPeriod = 4096;

// Planes layout: number of parts each channel is split into. 1 means "channel-local": one task
// owns a whole channel, computes its statistics and applies them while the channel is still in
// L2 (x is read from memory once). More parts when there are too few channels to balance the
// threads; then C * P is a multiple of the thread count.
inline int64_t plan_plane_splits(int64_t C, int64_t M, int64_t threads) {
  if (threads <= 1 || C >= 4 * threads || C % threads == 0) {
    return 1;
  }
  int64_t a = C, b = threads;
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  const int64_t P = threads / a;
  return std::max<int64_t>(1, std::min<int64_t>(P, M / kMinTaskElems));
}

// Rows layout: super-row of k rows so that W = k * C is a multiple of `step` (when reasonable).
inline int64_t plan_row_period(int64_t C, int64_t step) {
  if (C <= 0 || C % step == 0) {
    return 1;
  }
  int64_t a = C, b = step;
  while (b != 0) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  const int64_t lcm = C / a * step;
  return lcm <= kMaxPeriod ? lcm / C : 1;
}

// Rows layout: number of contiguous chunks of super-rows (one per thread; 1 when small).
inline int64_t plan_row_chunks(int64_t G, int64_t numel, int64_t threads) {
  if (threads <= 1 || numel < kParallelMinElems || G <= 1) {
    return 1;
  }
  return std::min<int64_t>(threads, G);
}

// Planes layout work split into C·P tasks: task t covers part t % P of channel t / P, the
// channel's elements [M·p/P, M·(p+1)/P) in n-major order. With P == 1 a task is a whole channel,
// and a thread takes at least kParallelMinElems elements' worth of channels.
struct PlaneTasks {
  int64_t C, S, M, P;
  PlaneTasks(int64_t N, int64_t C_, int64_t S_, int64_t threads)
      : C(C_), S(S_), M(N * S_), P(plan_plane_splits(C_, N * S_, threads)) {}
  int64_t count() const { return C * P; }
  int64_t grain() const {
    return P == 1 ? std::max<int64_t>(1, kParallelMinElems / std::max<int64_t>(M, 1)) : 1;
  }
  int64_t channel(int64_t t) const { return t / P; }
  // Calls f(offset, len) for the contiguous pieces of task t (offset: linear element index).
  template <typename F>
  C10_ALWAYS_INLINE void for_each_span(int64_t t, const F& f) const {
    const int64_t c = t / P, p = t % P;
    const int64_t e1 = M * (p + 1) / P;
    int64_t e = M * p / P;
    while (e < e1) {
      const int64_t n = e / S;
      const int64_t s = e - n * S;
      const int64_t len = std::min(S - s, e1 - e);
      f((n * C + c) * S + s, len);
      e += len;
    }
  }
};

// Rows layout work split: the R = N·S rows of C values are grouped into G super-rows of k rows
// (width W = k·C, see plan_row_period) and Rl < k leftover rows; the super-rows are cut into P
// contiguous chunks, chunk p = [G·p/P, G·(p+1)/P), each reduced and applied by one thread.
struct RowPlan {
  int64_t C, k, W, G, Rl, P;
  RowPlan(int64_t C_, int64_t R, int64_t step, int64_t threads)
      : C(C_), k(plan_row_period(C_, step)), W(k * C_), G(R / k), Rl(R - G * k),
        P(plan_row_chunks(G, R * C_, threads)) {}
  int64_t chunk_begin(int64_t p) const { return G * p / P; }
  int64_t chunk_end(int64_t p) const { return G * (p + 1) / P; }
};

// Per-channel values v[0, C) repeated over a super-row: v[j] = v[j % C] for j in [C, W).
template <typename A>
inline void repeat_channels(std::vector<A>& v, int64_t C, int64_t W) {
  v.resize(W);
  for (int64_t j = C; j < W; ++j) {
    v[j] = v[j % C];
  }
}

// Calls f(std::bool_constant<a>{}, std::bool_constant<b>{}): runtime flags to template constants.
template <typename F>
C10_ALWAYS_INLINE void dispatch_bools(bool a, bool b, const F& f) {
  if (a) {
    b ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
  } else {
    b ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
  }
}

inline int64_t divup(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// ---------------------------------------------------------------------------------------------
// Vector load/store in the accumulation type.

// Non-temporal (streaming) store of one Vectorized<T> to an address aligned to its size. Large
// outputs are written this way: no read-for-ownership of the destination lines, and the
// output does not evict the inputs from the last-level cache. Falls back to a plain store when
// the build has no x86 vector ISA selected.
#if defined(CPU_CAPABILITY_AVX512)
#define FR_HAVE_STREAM 1
C10_ALWAYS_INLINE void stream_vec(float* p, const at::vec::Vectorized<float>& v) {
  _mm512_stream_ps(p, __m512(v));
}
C10_ALWAYS_INLINE void stream_vec(double* p, const at::vec::Vectorized<double>& v) {
  _mm512_stream_pd(p, __m512d(v));
}
template <typename T>
C10_ALWAYS_INLINE void stream_vec(T* p, const at::vec::Vectorized<T>& v) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), __m512i(v));
}
#elif defined(CPU_CAPABILITY_AVX2)
#define FR_HAVE_STREAM 1
C10_ALWAYS_INLINE void stream_vec(float* p, const at::vec::Vectorized<float>& v) {
  _mm256_stream_ps(p, __m256(v));
}
C10_ALWAYS_INLINE void stream_vec(double* p, const at::vec::Vectorized<double>& v) {
  _mm256_stream_pd(p, __m256d(v));
}
template <typename T>
C10_ALWAYS_INLINE void stream_vec(T* p, const at::vec::Vectorized<T>& v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), __m256i(v));
}
#else
#define FR_HAVE_STREAM 0
template <typename T>
C10_ALWAYS_INLINE void stream_vec(T* p, const at::vec::Vectorized<T>& v) {
  v.store(p);
}
#endif

// Orders this thread's streaming stores before whatever follows (end of a parallel task).
C10_ALWAYS_INLINE void stream_fence() {
#if FR_HAVE_STREAM
  _mm_sfence();
#endif
}

// Whether an op touching `bytes` of activations (all inputs and outputs) should stream its
// outputs: when they would not stay in the last-level cache anyway, and in the two-pass
// training ops already from a smaller size (the thresholds and their measurements are in
// bn_act_common.cpp).
enum class Pass { kOne, kTwo };  // inputs read once (eval) or twice (training forward, backward)
bool use_streaming_stores(int64_t bytes, Pass passes);

// Number of leading elements of p to skip so that p + head is aligned for stream_vec, or -1
// when no such head exists (p not even element-aligned).
template <typename T>
C10_ALWAYS_INLINE int64_t stream_head(const T* p) {
  constexpr uintptr_t kAlign = sizeof(at::vec::Vectorized<T>);
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % sizeof(T) != 0) {
    return -1;
  }
  return static_cast<int64_t>(((kAlign - a % kAlign) % kAlign) / sizeof(T));
}

template <typename T>
struct VecT {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  using acc_t = T;
  using AV = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kParts = 1;
  static constexpr int64_t kStep = AV::size();
  static C10_ALWAYS_INLINE void load(const T* p, AV (&o)[1]) { o[0] = AV::loadu(p); }
  static C10_ALWAYS_INLINE void store(T* p, const AV (&v)[1]) { v[0].store(p); }
  static C10_ALWAYS_INLINE void store_nt(T* p, const AV (&v)[1]) { stream_vec(p, v[0]); }
  // The values as store() leaves them in memory (T = acc_t: unchanged).
  static C10_ALWAYS_INLINE void round(const AV (&v)[1], AV (&o)[1]) { o[0] = v[0]; }
};

template <typename T>
struct VecReduced {
  using acc_t = float;
  using AV = at::vec::Vectorized<float>;
  using RV = at::vec::Vectorized<T>;
  static constexpr int64_t kParts = 2;
  static constexpr int64_t kStep = RV::size();
  static_assert(RV::size() == 2 * AV::size());
  static C10_ALWAYS_INLINE void load(const T* p, AV (&o)[2]) {
    auto v = at::vec::convert_to_float<T>(RV::loadu(p));
    o[0] = std::get<0>(v);
    o[1] = std::get<1>(v);
  }
  static C10_ALWAYS_INLINE void store(T* p, const AV (&v)[2]) {
    at::vec::convert_from_float<T>(v[0], v[1]).store(p);
  }
  static C10_ALWAYS_INLINE void store_nt(T* p, const AV (&v)[2]) {
    stream_vec(p, at::vec::convert_from_float<T>(v[0], v[1]));
  }
  // The values as store() leaves them in memory: rounded to T (a tiny positive may become 0).
  static C10_ALWAYS_INLINE void round(const AV (&v)[2], AV (&o)[2]) {
    auto r = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v[0], v[1]));
    o[0] = std::get<0>(r);
    o[1] = std::get<1>(r);
  }
};
template <>
struct VecT<c10::Half> : VecReduced<c10::Half> {};
template <>
struct VecT<c10::BFloat16> : VecReduced<c10::BFloat16> {};

template <typename T>
using acc_type = typename VecT<T>::acc_t;

// relu with eager's NaN behaviour: relu(NaN) = NaN. (max_ps(0, z) returns its second operand
// when either is NaN, which is what Vectorized::clamp_min(z, 0) compiles to.)
template <typename AV>
C10_ALWAYS_INLINE AV relu_vec(const AV& z, const AV& zero) {
  return at::vec::clamp_min(z, zero);
}
template <typename A>
C10_ALWAYS_INLINE A relu_scalar(A z) {
  return z <= A(0) ? A(0) : z;  // NaN <= 0 is false: NaN passes
}

// dz = grad where out > 0, 0 where out <= 0; NaN out lets the gradient through (aten's
// threshold_backward: out <= threshold ? 0 : grad).
// The lanes where relu passes no gradient: out <= 0 (all ones there; NaN out is not among them).
template <typename AV>
C10_ALWAYS_INLINE AV relu_off_vec(const AV& y, const AV& zero) {
  return y <= zero;
}
template <typename AV>
C10_ALWAYS_INLINE AV relu_grad_vec(const AV& dy, const AV& y, const AV& zero) {
  return AV::blendv(dy, zero, relu_off_vec(y, zero));
}
template <typename A>
C10_ALWAYS_INLINE A relu_grad_scalar(A dy, A y) {
  return y <= A(0) ? A(0) : dy;
}

// ReLU masks packed as bits: bit e % 8 of byte e / 8 is set where out[e] <= 0 (dz = 0), e the
// element's index in memory order. This is the CPU form of bn_act_fwd_train's relu_mask, and
// what bn_act_bwd records for itself when it gets none (bn_act_bwd.cpp, RowMask). A byte holds
// the 8 float lanes of one Vectorized<float>: lane_bits packs relu_off_vec's result (lanes all
// ones or all zeros), lanes_from_bits expands a byte back into one, for blendv. Built with AVX2
// only (kHaveMaskBits); other builds read out instead.
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

// Bytes of a mask of numel elements (the size of relu_mask for a rows-layout input).
inline int64_t relu_mask_bytes(int64_t numel) {
  return (numel + 7) / 8;
}

// The length of the relu_mask bn_act_fwd_train returns for an input: a bit per element in the
// rows layout, none in the planes layout (bn_act_bwd reads out there).
inline int64_t cpu_relu_mask_bytes(const Geometry& g) {
  return g.rows ? relu_mask_bytes(g.numel()) : 0;
}

// Whether the rows-layout kernels keep the mask of this plan: every element of the super-rows
// then lies in a whole vector of float lanes (W a multiple of the step, T computed in float),
// so each vector's bits fill one byte (two for Half/BFloat16) and chunks start on a byte.
template <typename T>
constexpr bool kMaskableType = std::is_same_v<acc_type<T>, float>;
template <typename T>
C10_ALWAYS_INLINE bool rows_keep_mask(const RowPlan& plan) {
  return kHaveMaskBits && kMaskableType<T> && plan.W % VecT<T>::kStep == 0;
}

// Sets the mask bits of elements [j0, j1) of a span whose element 0 starts a mask byte, from
// their outputs, one at a time (the tails that no whole vector covers). A byte is cleared when
// its first element is reached, so j0 must start a byte or follow bits already set here.
template <typename T>
C10_ALWAYS_INLINE void set_mask_bits(MaskWord* mask, const T* y, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    if ((j & 7) == 0) {
      mask[j >> 3] = 0;
    }
    const bool off = static_cast<acc_type<T>>(y[j]) <= acc_type<T>(0);
    mask[j >> 3] |= static_cast<MaskWord>(off) << (j & 7);
  }
}

template <typename AV>
C10_ALWAYS_INLINE typename AV::value_type hsum(const AV& v) {
  using A = typename AV::value_type;
  alignas(64) A tmp[AV::size()];
  v.store(tmp);
  A s = tmp[0];
  for (int64_t i = 1; i < AV::size(); ++i) {
    s += tmp[i];
  }
  return s;
}

// Fully unrolls a loop with a compile-time trip count. Needed for arrays of Vectorized
// accumulators: GCC keeps them in registers only when every index is a constant (otherwise the
// accumulator chain goes through the stack, adding store-forwarding latency to every step).
#if defined(__clang__)
#define FR_UNROLL _Pragma("unroll")
#else
#define FR_UNROLL _Pragma("GCC unroll 16")
#endif

// Sum of n vectors in a fixed order (for the final reduction of independent accumulators).
template <typename AV, int64_t n>
C10_ALWAYS_INLINE AV sum_accumulators(const AV (&v)[n]) {
  AV t = v[0];
  FR_UNROLL
  for (int64_t i = 1; i < n; ++i) {
    t = t + v[i];
  }
  return t;
}

// ---------------------------------------------------------------------------------------------
// (count, mean, M2) with Chan's pairwise merge: for partials a, b with n = na + nb,
//   δ = mean_b − mean_a,  mean = mean_a + δ·nb/n,  M2 = M2_a + M2_b + δ²·na·nb/n.

template <typename A>
struct Moments {
  int64_t n = 0;
  A mean = A(0);
  A m2 = A(0);
};

template <typename A>
C10_ALWAYS_INLINE void merge_into(Moments<A>& a, int64_t nb, A mean_b, A m2_b) {
  if (nb == 0) {
    return;
  }
  if (a.n == 0) {
    a.n = nb;
    a.mean = mean_b;
    a.m2 = m2_b;
    return;
  }
  const int64_t n = a.n + nb;
  const A wb = A(nb) / A(n);
  const A delta = mean_b - a.mean;
  a.mean += delta * wb;
  a.m2 += m2_b + delta * delta * A(a.n) * wb;
  a.n = n;
}

template <typename A>
C10_ALWAYS_INLINE void merge_into(Moments<A>& a, const Moments<A>& b) {
  merge_into(a, b.n, b.mean, b.m2);
}

// (mean, biased variance) of merged moments; (0, 0) for an empty channel.
template <typename A>
C10_ALWAYS_INLINE std::pair<A, A> biased_mean_var(const Moments<A>& m) {
  const A mean = m.n > 0 ? m.mean : A(0);
  const A var = m.n > 0 ? m.m2 / A(m.n) : A(0);
  return {mean, var};
}

} // namespace fused_resnet::cpu
