// What every kernel of the CUDA backend reads and writes with: the block size, vector accesses of
// L elements (16 bytes, or 1 element), the accumulation type, per-channel vectors. (The
// activations are in activation.cuh.)
#pragma once

#include "bn_act_cuda.h"

#include <cstdint>

namespace fused_resnet::cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// At least two resident blocks (512 threads, <= 128 registers each) per multiprocessor, so that
// enough 16-byte loads are in flight to cover DRAM latency.
constexpr int kMinBlocksPerSM = 2;

template <typename T>
constexpr int vec_lanes() {
  return 16 / static_cast<int>(sizeof(T));
}

// ---------------------------------------------------------------------------------------------
// Memory access.

template <typename T, int L>
struct alignas(sizeof(T) * L) Pack {
  T v[L];
};

template <typename T, int L>
__device__ __forceinline__ Pack<T, L> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, L>*>(p);
}

template <typename T, int L, typename A>
__device__ __forceinline__ void store_pack(T* p, const A (&v)[L]) {
  Pack<T, L> pk;
#pragma unroll
  for (int j = 0; j < L; ++j) {
    pk.v[j] = static_cast<T>(v[j]);
  }
  *reinterpret_cast<Pack<T, L>*>(p) = pk;
}

template <typename A, typename T>
__device__ __forceinline__ A to_acc(T v) {
  return static_cast<A>(v);
}

// Element c of a per-channel vector in the accumulation type; `fill` when it is absent.
template <typename T, typename A>
__device__ __forceinline__ A load_channel(const ChannelVec& v, int64_t c, A fill) {
  if (v.ptr == nullptr) {
    return fill;
  }
  const int64_t i = c * v.stride;
  return v.is_float ? static_cast<A>(static_cast<const float*>(v.ptr)[i])
                    : static_cast<A>(static_cast<const T*>(v.ptr)[i]);
}

// 1/v correctly rounded, without the full division sequence (Welford's per-access weight).
__device__ __forceinline__ float reciprocal(float v) {
  return __frcp_rn(v);
}
__device__ __forceinline__ double reciprocal(double v) {
  return __drcp_rn(v);
}

} // namespace fused_resnet::cuda
