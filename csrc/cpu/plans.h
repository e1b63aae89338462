// How the kernels split an input over threads, and the constants that size their blocks:
//   planes [N][C][S]: C·P tasks (PlaneTasks), P parts per channel (1: channel-local, a task
//     owns a channel and applies it while it is still in L2);
//   rows [N*S][C]: super-rows of k rows, W = k·C a multiple of the vector width even when C is
//     not (C = 3, 19, ...; per-position parameters are then expanded to W entries, position j is
//     channel j % C), cut into one contiguous chunk per thread (RowPlan).
#pragma once

#include <c10/macros/Macros.h>

#include "vec.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fused_resnet::cpu {

// ---------------------------------------------------------------------------------------------
// Tuning constants.

// Below this many elements an op runs on the calling thread (an OpenMP fork costs ~µs).
constexpr int64_t kParallelMinElems = 32768;
// The same for a pass that evaluates activation Fn (act_math.h) per element, the forward's apply
// and the short planes' backward: a quarter of it where an element evaluates exp, erf or tanh
// (4-8x a cheap element's time), so that a second thread pays for its fork sooner (bn_silu eval
// 4x480x4x4, 30720 elements: 0.94x -> 1.17x eager).
template <typename Fn>
constexpr int64_t kActParallelMinElems =
    Fn::kTranscendentalGrad ? kParallelMinElems / 4 : kParallelMinElems;
// A stats block: the two-pass (sum, then centred squares) over one block reads it from L1.
constexpr int64_t kBlockBytes = 16384;
// A task of the split (small-C) planes path covers at least this many elements.
constexpr int64_t kMinTaskElems = 16384;
// Rows layout: accumulators of a register tile (Vectorized<acc> per sum), and rows per block
// (a tile's column slice of a block stays in L1 between the two passes of the statistics).
// A tile spans 8 vectors (256 bytes of fp32, a whole row at C = 64) so that it reads each row
// in runs of 4 cache lines: at 2 lines per row, at a stride of the row, the hardware prefetchers
// fall behind (benchmarks/NOTES.md has the measurement).
constexpr int64_t kTileVectors = 8;
constexpr int64_t kRowBlock = 64;
// Largest super-row that makes the rows period a multiple of the vector width.
constexpr int64_t kMaxPeriod = 4096;
// Planes layout: planes shorter than this (elements; a small input's last stages, 4x4, 2x2) are
// taken as blocks of channels with per-position parameters (ShortPlaneBlocks), the block's span
// of each sample in whole vectors, in the forward's apply (fwd.cpp) and in the backward
// (bwd_short_planes.h). Plane by plane they would run mostly through the scalar path and pay a
// span's setup for a few vectors.
template <typename T>
constexpr int64_t kShortPlane = 4 * VecT<T>::kStep;
// The short planes' blocks: at most this many positions (the forward repeats scale and shift
// into two stack buffers of acc_t, 8 KB of float: L1-resident).
constexpr int64_t kShortPlaneBlock = 1024;

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

inline int64_t divup(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Planes layout, planes shorter than kShortPlane: the channels in blocks of cb channels
// (cb·S <= kShortPlaneBlock positions), the last one what is left; the blocks are the parallel
// tasks, a task at least `min_parallel` elements (of all N samples).
struct ShortPlaneBlocks {
  int64_t C, S, cb, count, grain;
  ShortPlaneBlocks(int64_t N, int64_t C_, int64_t S_, int64_t min_parallel)
      : C(C_), S(S_), cb(std::max<int64_t>(1, kShortPlaneBlock / S_)), count(divup(C_, cb)),
        grain(std::max<int64_t>(1, min_parallel / (N * cb * S_))) {}
  int64_t begin(int64_t b) const { return b * cb; }
  int64_t end(int64_t b) const { return std::min(C, (b + 1) * cb); }
};

// dst[i·S + s] = v[i] for a block's `channels` per-channel values v and s < S: its per-position
// values in the planes layout.
template <typename A>
C10_ALWAYS_INLINE void repeat_block(A* dst, const A* v, int64_t channels, int64_t S) {
  for (int64_t i = 0; i < channels; ++i) {
    std::fill(dst + i * S, dst + (i + 1) * S, v[i]);
  }
}

} // namespace fused_resnet::cpu
