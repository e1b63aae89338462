// The reductions' accumulator states: Moments (count, mean, M2) for the statistics, Sums for the
// backward's Σdz and Σdz·(x − mean); their staging buffers, warp shuffles and block merges.
#pragma once

#include "access.cuh"

#include <cstdint>

namespace fused_resnet::cuda {

// ---------------------------------------------------------------------------------------------
// Accumulator states. A state holds L lanes (the L elements of one access); in the planes layout
// all lanes belong to one channel and are collapsed to one lane before the block merge.

// Moments (count, mean, M2), accumulated with Welford's update (push) and merged with Chan's
// formula (as the CPU backend's Moments, csrc/cpu/moments.h): for partials a, b with n = na + nb,
//   δ = mean_b − mean_a,  mean = mean_a + δ·nb/n,  M2 = M2_a + M2_b + δ²·na·nb/n.
template <typename A>
struct MomentsStaging {
  A* mean;
  A* m2;
  int64_t* n;
  static int64_t bytes(int64_t entries) {
    return entries * int64_t(2 * sizeof(A) + sizeof(int64_t));
  }
  // `base` 16-byte aligned; the three arrays follow each other, int64 first (alignment).
  static MomentsStaging carve(char* base, int64_t entries) {
    MomentsStaging s;
    s.n = reinterpret_cast<int64_t*>(base);
    s.mean = reinterpret_cast<A*>(base + entries * int64_t(sizeof(int64_t)));
    s.m2 = s.mean + entries;
    return s;
  }
};

template <typename A, int L>
struct Moments {
  using Staging = MomentsStaging<A>;
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

  __device__ __forceinline__ void merge(const Moments& o) {
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

  __device__ __forceinline__ Moments shfl_xor(int offset) const {
    Moments r;
    r.n = __shfl_xor_sync(kFullMask, n, offset);
#pragma unroll
    for (int j = 0; j < L; ++j) {
      r.mean[j] = __shfl_xor_sync(kFullMask, mean[j], offset);
      r.m2[j] = __shfl_xor_sync(kFullMask, m2[j], offset);
    }
    return r;
  }

  __device__ __forceinline__ Moments<A, 1> lane(int j) const {
    Moments<A, 1> r;
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
  __device__ __forceinline__ static Moments load(const Staging& s, int64_t g, int64_t C,
                                                 int64_t c0) {
    Moments r;
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

// Two plain sums per lane, the backward's (bn_act_bwd_reduce.cu): sum_dz = Σdz and
// sum_dz_xmu = Σdz·(x − mean) (times invstd, Σdz·x̂, at the finalize).
template <typename A>
struct SumsStaging {
  A* sum_dz;
  A* sum_dz_xmu;
  static int64_t bytes(int64_t entries) {
    return entries * int64_t(2 * sizeof(A));
  }
  static SumsStaging carve(char* base, int64_t entries) {
    SumsStaging s;
    s.sum_dz = reinterpret_cast<A*>(base);
    s.sum_dz_xmu = s.sum_dz + entries;
    return s;
  }
};

template <typename A, int L>
struct Sums {
  using Staging = SumsStaging<A>;
  A sum_dz[L];      // Σdz
  A sum_dz_xmu[L];  // Σdz·(x − mean)

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int j = 0; j < L; ++j) {
      sum_dz[j] = A(0);
      sum_dz_xmu[j] = A(0);
    }
  }

  __device__ __forceinline__ void merge(const Sums& o) {
#pragma unroll
    for (int j = 0; j < L; ++j) {
      sum_dz[j] += o.sum_dz[j];
      sum_dz_xmu[j] += o.sum_dz_xmu[j];
    }
  }

  __device__ __forceinline__ Sums shfl_xor(int offset) const {
    Sums r;
#pragma unroll
    for (int j = 0; j < L; ++j) {
      r.sum_dz[j] = __shfl_xor_sync(kFullMask, sum_dz[j], offset);
      r.sum_dz_xmu[j] = __shfl_xor_sync(kFullMask, sum_dz_xmu[j], offset);
    }
    return r;
  }

  __device__ __forceinline__ Sums<A, 1> lane(int j) const {
    Sums<A, 1> r;
    r.sum_dz[0] = sum_dz[j];
    r.sum_dz_xmu[0] = sum_dz_xmu[j];
    return r;
  }

  __device__ __forceinline__ void store(const Staging& s, int64_t g, int64_t C, int64_t c0) const {
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const int64_t i = g * C + c0 + j;
      s.sum_dz[i] = sum_dz[j];
      s.sum_dz_xmu[i] = sum_dz_xmu[j];
    }
  }

  __device__ __forceinline__ static Sums load(const Staging& s, int64_t g, int64_t C, int64_t c0) {
    Sums r;
#pragma unroll
    for (int j = 0; j < L; ++j) {
      const int64_t i = g * C + c0 + j;
      r.sum_dz[j] = __ldcg(s.sum_dz + i);
      r.sum_dz_xmu[j] = __ldcg(s.sum_dz_xmu + i);
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
