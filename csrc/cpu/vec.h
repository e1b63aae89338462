// Vectors of the accumulation type: VecT<T> loads and stores T as Vectorized<acc_t> (acc_t =
// double for double, else float; Half/BFloat16 load one Vectorized<T> of 16 lanes as two of
// float), streaming (non-temporal) stores, and the horizontal sums of accumulators. (The
// activations on these vectors are in act_math.h.)
//
// setup.py compiles with -mavx2 -mfma -DCPU_CAPABILITY_AVX2 when the build machine has AVX2+FMA,
// which selects the 256-bit at::vec implementation (checked below); any other build uses
// at::vec's portable fallback and still computes the same results.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2)
static_assert(
    at::vec::Vectorized<float>::size() == 8,
    "CPU_CAPABILITY_AVX2 should select at::vec's 256-bit implementation");
#endif

namespace fused_resnet::cpu {

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

} // namespace fused_resnet::cpu
