// How the kernels cut the view into tiles.
//
// Tiling. The activation is a matrix [outer][inner] (bn_act_cuda.h). A thread makes accesses of L
// elements: L = 16 bytes / sizeof(T) when `inner` is a multiple of it and every pointer is 16-byte
// aligned (one 128-bit load or store), else L = 1. A block of kThreads threads is bx x by
// (bx along inner, by along outer, both powers of two); per tile each thread makes U independent
// accesses (Ui along inner, U/Ui along outer) and issues all their loads before using any, so
// that U accesses per thread are in flight. U = Op::kUnroll: 4 for the forward passes, 2 for the
// backward ones, which load three tensors per access (fewer registers, no spills).
//   planes, reduce: block (c, g) owns channel c's tiles [g*tps, (g+1)*tps) of its [N][S] planes
//   planes, apply:  tiles of the [N*C][S] matrix, grid-stride; a thread row is one (n, c) plane
//   rows:           bx threads span a column tile of bx*L channels, so a thread's channels are
//                   fixed; reduce blocks split the N*S rows into contiguous ranges, apply blocks
//                   stride over row tiles.
//
// Determinism: every order (per-thread accumulation, shuffle tree, shared-memory tree, the last
// block's merge over the staged partials) depends only on the shape, never on scheduling.
#pragma once

#include "access.cuh"

#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace fused_resnet::cuda {

// ---------------------------------------------------------------------------------------------
// The tiling of a view.

struct Tiling {
  int64_t C;
  int64_t outer;        // rows of the tiled matrix: N (planes, reduce), N*C (planes, apply), N*S (rows)
  int64_t inner;        // elements per row: S (planes) or C (rows)
  int64_t inner_v;      // accesses per row: inner / L
  int bx_shift;         // bx = 1 << bx_shift, by = kThreads >> bx_shift
  int unroll;           // U accesses per thread per tile
  int ui_shift;         // Ui = 1 << ui_shift of them along inner, U / Ui along outer
  int64_t tiles_inner;  // ceil(inner_v / (bx * Ui))
  int64_t tiles_outer;  // ceil(outer / (by * U / Ui))
  int64_t splits;       // reduce: blocks per channel group; rows apply: blocks per column tile
  int64_t tiles_per_split;  // reduce: consecutive tiles of one block
};

// Row o and access index v (along inner) of a thread's access k in tile (to, ti).
__device__ __forceinline__ void tile_access(const Tiling& t, int64_t to, int64_t ti, int k, int tx,
                                            int ty, int64_t& o, int64_t& v) {
  const int bx = 1 << t.bx_shift;
  const int by = kThreads >> t.bx_shift;
  const int ui = 1 << t.ui_shift;
  const int uo = t.unroll >> t.ui_shift;
  o = to * int64_t(by * uo) + int64_t((k >> t.ui_shift) * by + ty);
  v = ti * int64_t(bx * ui) + int64_t((k & (ui - 1)) * bx + tx);
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline int ceil_log2(int64_t v) {
  int s = 0;
  while ((int64_t(1) << s) < v) {
    ++s;
  }
  return s;
}

// Rows: one warp-wide column tile (bx = 32) unless a narrower one leaves fewer idle lanes in the
// last column tile; small C: the smallest power of two covering it.
inline Tiling plan_rows(int64_t R, int64_t C, int L, int U) {
  Tiling t{};
  t.unroll = U;
  t.C = C;
  t.outer = R;
  t.inner = C;
  t.inner_v = C / L;
  t.ui_shift = 0;
  if (t.inner_v <= 32) {
    t.bx_shift = ceil_log2(t.inner_v);
  } else {
    double best = -1.0;
    for (int s = 5; s >= 3; --s) {
      const int64_t bx = int64_t(1) << s;
      const double eff = double(t.inner_v) / double(ceil_div(t.inner_v, bx) * bx);
      if (eff > best + 0.02) {
        best = eff;
        t.bx_shift = s;
      }
    }
  }
  const int64_t by = kThreads >> t.bx_shift;
  t.tiles_inner = ceil_div(t.inner_v, int64_t(1) << t.bx_shift);
  t.tiles_outer = ceil_div(R, by * U);
  return t;
}

// Planes: the block shape and unroll split that waste the fewest access slots on the tiles'
// edges (idle lanes beyond a plane's end or beyond the last plane), preferring wide bx (long
// contiguous runs per warp) unless a narrower one is better by more than 2%. bx >= 8 where the
// plane has that many accesses, so a warp reads runs of at least 128 bytes.
inline Tiling plan_planes(int64_t outer, int64_t C, int64_t S, int L, int U) {
  Tiling t{};
  t.unroll = U;
  t.C = C;
  t.outer = outer;
  t.inner = S;
  t.inner_v = S / L;
  const int min_shift = std::min(3, ceil_log2(t.inner_v));
  double best = -1.0;
  for (int s = 8; s >= min_shift; --s) {
    for (int u = ceil_log2(U); u >= 0; --u) {
      const int64_t span_in = (int64_t(1) << s) << u;
      const int64_t span_out = (int64_t(kThreads) >> s) * (int64_t(U) >> u);
      const double eff = double(t.inner_v) / double(ceil_div(t.inner_v, span_in) * span_in) *
                         double(outer) / double(ceil_div(outer, span_out) * span_out);
      if (eff > best + 0.02) {
        best = eff;
        t.bx_shift = s;
        t.ui_shift = u;
      }
    }
  }
  const int64_t span_in = (int64_t(1) << t.bx_shift) << t.ui_shift;
  const int64_t span_out = (int64_t(kThreads) >> t.bx_shift) * (int64_t(U) >> t.ui_shift);
  t.tiles_inner = ceil_div(t.inner_v, span_in);
  t.tiles_outer = ceil_div(outer, span_out);
  return t;
}

// Blocks of kKernel that fit on the device at once: one wave, which the launches fill (each
// block loops over tiles). Cached per kernel; the occupancy query does not touch any stream.
template <auto kKernel>
int64_t wave_blocks() {
  static const int per_sm = [] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kKernel, kThreads, 0));
    return std::max(blocks, 1);
  }();
  return int64_t(per_sm) * multiprocessor_count();
}

// Whether every (non-null) pointer is 16-byte aligned.
inline bool aligned_16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) {
      return false;
    }
  }
  return true;
}

// Whether every pointer allows 16-byte accesses along rows of `inner` elements.
template <typename T>
bool vector_ok(int64_t inner, std::initializer_list<const void*> ptrs) {
  return inner % vec_lanes<T>() == 0 && aligned_16(ptrs);
}

} // namespace fused_resnet::cuda
