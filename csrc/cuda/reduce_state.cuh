// The reductions' accumulator states: Welford (count, mean, M2) for the statistics, Sums for the
// backward's Σdz and Σdz·(x − mean); their staging buffers, warp shuffles and block merges.
#pragma once

#include "access.cuh"

#include <cstdint>

namespace fused_resnet::cuda {

// ---------------------------------------------------------------------------------------------
// Accumulator states. A state holds L lanes (the L elements of one access); in the planes layout
// all lanes belong to one channel and are collapsed to one lane before the block merge.

// Welford (count, mean, M2), merged with Chan's formula: for partials a, b with n = na + nb,
//   δ = mean_b − mean_a,  mean = mean_a + δ·nb/n,  M2 = M2_a + M2_b + δ²·na·nb/n.
template <typename A>
struct WelfordStaging {
  A* mean;
  A* m2;
  int64_t* n;
  static int64_t bytes(int64_t entries) {
    return entries * int64_t(2 * sizeof(A) + sizeof(int64_t));
  }
  // `base` 16-byte aligned; the three arrays follow each other, int64 first (alignment).
  static WelfordStaging carve(char* base, int64_t entries) {
    WelfordStaging s;
    s.n = reinterpret_cast<int64_t*>(base);
    s.mean = reinterpret_cast<A*>(base + entries * int64_t(sizeof(int64_t)));
    s.m2 = s.mean + entries;
    return s;
  }
};

template <typename A, int L>
struct Welford {
  using Staging = WelfordStaging<A>;
  int64_t n;  // shared by the lanes: every access is whole
  A mean[L];
  A m2[L];

  __device__ __forceinline__ void zero() {
    n = 0;
#pragma unroll
    for (int j = 0; j < L; ++j) {
      mean[j] = A(0);
      m2[j] = A(0);
    }
  }

  __device__ __forceinline__ void push(const A (&x)[L]) {
    ++n;
    const A inv = reciprocal(static_cast<A>(n));  // one per access, shared by the lanes
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const A d = x[j] - mean[j];
      mean[j] += d * inv;
      m2[j] += d * (x[j] - mean[j]);
    }
  }

  __device__ __forceinline__ void merge(const Welford& o) {
    if (o.n == 0) {
      return;
    }
    if (n == 0) {
      *this = o;
      return;
    }
    const int64_t total = n + o.n;
    const A wb = static_cast<A>(o.n) / static_cast<A>(total);
    const A wab = static_cast<A>(n) * wb;
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const A d = o.mean[j] - mean[j];
      mean[j] += d * wb;
      m2[j] += o.m2[j] + d * d * wab;
    }
    n = total;
  }

  __device__ __forceinline__ Welford shfl_xor(int offset) const {
    Welford r;
    r.n = __shfl_xor_sync(kFullMask, n, offset);
#pragma unroll
    for (int j = 0; j < L; ++j) {
      r.mean[j] = __shfl_xor_sync(kFullMask, mean[j], offset);
      r.m2[j] = __shfl_xor_sync(kFullMask, m2[j], offset);
    }
    return r;
  }

  __device__ __forceinline__ Welford<A, 1> lane(int j) const {
    Welford<A, 1> r;
    r.n = n;
    r.mean[0] = mean[j];
    r.m2[0] = m2[j];
    return r;
  }

  // Lanes j < L go to channels c0 + j of staging row g (g * C + c0 + j).
  __device__ __forceinline__ void store(const Staging& s, int64_t g, int64_t C, int64_t c0) const {
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const int64_t i = g * C + c0 + j;
      s.n[i] = n;
      s.mean[i] = mean[j];
      s.m2[i] = m2[j];
    }
  }

  // Reads what other blocks stored (L2, bypassing the non-coherent L1).
  __device__ __forceinline__ static Welford load(const Staging& s, int64_t g, int64_t C,
                                                 int64_t c0) {
    Welford r;
    r.n = __ldcg(reinterpret_cast<const long long*>(s.n) + g * C + c0);
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const int64_t i = g * C + c0 + j;
      r.mean[j] = __ldcg(s.mean + i);
      r.m2[j] = __ldcg(s.m2 + i);
    }
    return r;
  }
};

// Two plain sums per lane (backward: Σdz and Σdz·(x − mean)).
template <typename A>
struct SumsStaging {
  A* s1;
  A* s2;
  static int64_t bytes(int64_t entries) {
    return entries * int64_t(2 * sizeof(A));
  }
  static SumsStaging carve(char* base, int64_t entries) {
    SumsStaging s;
    s.s1 = reinterpret_cast<A*>(base);
    s.s2 = s.s1 + entries;
    return s;
  }
};

template <typename A, int L>
struct Sums {
  using Staging = SumsStaging<A>;
  A s1[L];
  A s2[L];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int j = 0; j < L; ++j) {
      s1[j] = A(0);
      s2[j] = A(0);
    }
  }

  __device__ __forceinline__ void merge(const Sums& o) {
#pragma unroll
    for (int j = 0; j < L; ++j) {
      s1[j] += o.s1[j];
      s2[j] += o.s2[j];
    }
  }

  __device__ __forceinline__ Sums shfl_xor(int offset) const {
    Sums r;
#pragma unroll
    for (int j = 0; j < L; ++j) {
      r.s1[j] = __shfl_xor_sync(kFullMask, s1[j], offset);
      r.s2[j] = __shfl_xor_sync(kFullMask, s2[j], offset);
    }
    return r;
  }

  __device__ __forceinline__ Sums<A, 1> lane(int j) const {
    Sums<A, 1> r;
    r.s1[0] = s1[j];
    r.s2[0] = s2[j];
    return r;
  }

  __device__ __forceinline__ void store(const Staging& s, int64_t g, int64_t C, int64_t c0) const {
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const int64_t i = g * C + c0 + j;
      s.s1[i] = s1[j];
      s.s2[i] = s2[j];
    }
  }

  __device__ __forceinline__ static Sums load(const Staging& s, int64_t g, int64_t C, int64_t c0) {
    Sums r;
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const int64_t i = g * C + c0 + j;
      r.s1[j] = __ldcg(s.s1 + i);
      r.s2[j] = __ldcg(s.s2 + i);
    }
    return r;
  }
};

// Merges the states of the threads of a block that share tx = threadIdx.x % width (width: a
// power of two <= 32), in a fixed order: shuffles over the lanes of a warp that differ in ty,
// then a tree over the warps in shared memory. On return, the threads of warp 0 with
// lane < width hold the merge for tx = lane. Every thread of the block must call it.
template <typename State>
__device__ __forceinline__ State block_merge(State st, int width, State (*smem)[32]) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int offset = 16; offset >= width; offset >>= 1) {
    const State other = st.shfl_xor(offset);
    st.merge(other);
  }
  if (lane < width) {
    smem[warp][lane] = st;
  }
  __syncthreads();
#pragma unroll
  for (int s = kWarps / 2; s > 0; s >>= 1) {
    if (warp < s && lane < width) {
      st.merge(smem[warp + s][lane]);
      smem[warp][lane] = st;
    }
    __syncthreads();
  }
  return st;
}

// The L lanes of a state that all belong to one channel, merged into one lane in lane order
// (the same order, so the same rounding, on every run).
template <template <typename, int> class State, typename A, int L>
__device__ __forceinline__ State<A, 1> collapse_lanes(const State<A, L>& st) {
  State<A, 1> r = st.lane(0);
#pragma unroll
  for (int j = 1; j < L; ++j) {
    r.merge(st.lane(j));
  }
  return r;
}

} // namespace fused_resnet::cuda
