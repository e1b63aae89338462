// Kernel skeletons of the CUDA backend, shared by the four kernel files:
//
//   reduce_kernel  per-channel reductions (statistics, backward sums), one launch:
//                  per-thread accumulation -> warp shuffles -> shared-memory merge -> each block's
//                  partial to a staging buffer -> the last block of a channel group (atomic
//                  counter) merges the partials in a fixed order and writes the result.
//   apply_kernel   elementwise passes with per-channel coefficients (forward apply, eval,
//                  backward apply).
//
// An op (StatsOp, BwdReduceOp in the .cu files; FwdApplyOp, BwdApplyOp) supplies what is loaded
// and how it is combined; the skeleton supplies the tiling, the vector accesses and the merges.
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

#include "bn_act_cuda.h"

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

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

// relu with eager's NaN behaviour (NaN <= 0 is false: NaN passes), and its gradient mask
// (aten's threshold_backward: 0 where out <= 0, so a NaN output lets the gradient through).
template <typename A>
__device__ __forceinline__ A relu(A z) {
  return z <= A(0) ? A(0) : z;
}
template <typename A>
__device__ __forceinline__ A relu_grad(A dy, A y) {
  return y <= A(0) ? A(0) : dy;
}

// 1/v correctly rounded, without the full division sequence (Welford's per-access weight).
__device__ __forceinline__ float reciprocal(float v) {
  return __frcp_rn(v);
}
__device__ __forceinline__ double reciprocal(double v) {
  return __drcp_rn(v);
}

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

  // The lanes of one channel merged into one, in lane order.
  __device__ __forceinline__ Welford<A, 1> collapse() const {
    Welford<A, 1> r = lane(0);
#pragma unroll
    for (int j = 1; j < L; ++j) {
      r.merge(lane(j));
    }
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

  __device__ __forceinline__ Sums<A, 1> collapse() const {
    Sums<A, 1> r = lane(0);
#pragma unroll
    for (int j = 1; j < L; ++j) {
      r.merge(lane(j));
    }
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

// ---------------------------------------------------------------------------------------------
// Tiling (see the top of the file).

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

// Whether every pointer allows 16-byte accesses along rows of `inner` elements.
template <typename T>
bool vector_ok(int64_t inner, std::initializer_list<const void*> ptrs) {
  if (inner % vec_lanes<T>() != 0) {
    return false;
  }
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) {
      return false;
    }
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Reduction skeleton. Op provides:
//   kUnroll                         accesses per thread per tile
//   template <int L> using State;   Welford<A, L> or Sums<A, L>
//   struct Ctx;  Ctx context(c)     per-channel values needed while accumulating
//   template <int L> struct Item;   one access's loaded data
//   load<L>(Item&, off), accumulate<L>(State<L>&, const Ctx (&)[L], const Item<L>&, off)
//   finalize(c, const State<1>&)    writes channel c's result
// Grid: groups x splits blocks, groups = C (planes) or column tiles (rows). counters[groups] must
// be zero at launch.

template <typename T, int L, bool kRows, typename Op>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    reduce_kernel(const Op op, const Tiling tl, const typename Op::template State<1>::Staging ws,
                  int* counters) {
  using State = typename Op::template State<L>;
  using State1 = typename Op::template State<1>;
  using Ctx = typename Op::Ctx;
  using Item = typename Op::template Item<L>;
  constexpr int U = Op::kUnroll;

  const int tx = threadIdx.x & ((1 << tl.bx_shift) - 1);
  const int ty = threadIdx.x >> tl.bx_shift;
  const int by = kThreads >> tl.bx_shift;
  const int64_t groups = kRows ? tl.tiles_inner : tl.C;
  const int64_t grp = blockIdx.x % groups;
  const int64_t g = blockIdx.x / groups;
  const int64_t tiles = kRows ? tl.tiles_outer : tl.tiles_outer * tl.tiles_inner;
  const int64_t t_begin = g * tl.tiles_per_split;
  const int64_t t_end = t_begin + tl.tiles_per_split < tiles ? t_begin + tl.tiles_per_split : tiles;
  // rows: this thread's access column (its L channels start at v_col * L); planes: channel grp
  const int64_t v_col = grp * (int64_t(1) << tl.bx_shift) + tx;
  const bool active = !kRows || v_col < tl.inner_v;

  // Shared memory of the two block merges (block partial, then the last block's final merge).
  constexpr size_t kMergeBytes = kWarps * 32 * (kRows ? sizeof(State) : sizeof(State1));
  __shared__ __align__(16) unsigned char merge_smem[kMergeBytes];
  [[maybe_unused]] auto* smem = reinterpret_cast<State(*)[32]>(merge_smem);
  [[maybe_unused]] auto* smem1 = reinterpret_cast<State1(*)[32]>(merge_smem);

  State st;
  st.zero();
  if (active) {
    Ctx ctx[L];
#pragma unroll
    for (int j = 0; j < L; ++j) {
      ctx[j] = op.context(kRows ? v_col * L + j : grp);
    }
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t to = kRows ? t : t / tl.tiles_inner;
      const int64_t ti = kRows ? grp : t % tl.tiles_inner;
      Item item[U];
      int64_t off[U];
      bool ok[U];
#pragma unroll
      for (int k = 0; k < U; ++k) {
        int64_t o, v;
        tile_access(tl, to, ti, k, tx, ty, o, v);
        ok[k] = o < tl.outer && v < tl.inner_v;
        const int64_t row = kRows ? o : o * tl.C + grp;
        off[k] = row * tl.inner + v * L;
        if (ok[k]) {
          op.template load<L>(item[k], off[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < U; ++k) {
        if (ok[k]) {
          op.template accumulate<L>(st, ctx, item[k], off[k]);
        }
      }
    }
  }

  // This block's partial to the staging buffer, row g.
  if constexpr (kRows) {
    const State m = block_merge(st, 1 << tl.bx_shift, smem);
    if (threadIdx.x < (1 << tl.bx_shift) && active) {
      m.store(ws, g, tl.C, v_col * L);
    }
  } else {
    const State1 m = block_merge(st.collapse(), 1, smem1);
    if (threadIdx.x == 0) {
      m.store(ws, g, tl.C, grp);
    }
  }

  // The last block of the group to finish merges the group's partials (threadFenceReduction).
  __shared__ bool is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    is_last = atomicAdd(counters + grp, 1) == static_cast<int>(tl.splits - 1);
  }
  __syncthreads();
  if (!is_last) {
    return;
  }
  __threadfence();

  if constexpr (kRows) {
    State acc;
    acc.zero();
    if (active) {
      for (int64_t p = ty; p < tl.splits; p += by) {
        acc.merge(State::load(ws, p, tl.C, v_col * L));
      }
    }
    const State m = block_merge(acc, 1 << tl.bx_shift, smem);
    if (threadIdx.x < (1 << tl.bx_shift) && active) {
#pragma unroll
      for (int j = 0; j < L; ++j) {
        op.finalize(v_col * L + j, m.lane(j));
      }
    }
  } else {
    State1 acc;
    acc.zero();
    for (int64_t p = threadIdx.x; p < tl.splits; p += kThreads) {
      acc.merge(State1::load(ws, p, tl.C, grp));
    }
    const State1 m = block_merge(acc, 1, smem1);
    if (threadIdx.x == 0) {
      op.finalize(grp, m);
    }
  }
}

// Plans, allocates the workspace (staging partials + zeroed counters) and launches reduce_kernel.
template <typename T, int L, bool kRows, typename Op>
void run_reduce(const Op& op, const Layout& layout, Workspace& workspace, cudaStream_t stream) {
  using Staging = typename Op::template State<1>::Staging;
  Tiling tl = kRows ? plan_rows(layout.N * layout.S, layout.C, L, Op::kUnroll)
                    : plan_planes(layout.N, layout.C, layout.S, L, Op::kUnroll);
  const int64_t groups = kRows ? tl.tiles_inner : layout.C;
  const int64_t tiles = kRows ? tl.tiles_outer : tl.tiles_outer * tl.tiles_inner;
  const int64_t target = wave_blocks<&reduce_kernel<T, L, kRows, Op>>();
  // blocks per group: as many as fill one wave without starting a second (at least one)
  const int64_t want = std::min(std::max<int64_t>(target / groups, 1), tiles);
  tl.tiles_per_split = ceil_div(tiles, want);
  tl.splits = ceil_div(tiles, tl.tiles_per_split);
  const int64_t blocks = groups * tl.splits;
  TORCH_CHECK(blocks <= int64_t(INT32_MAX), "fused_resnet: too many channels (", layout.C, ")");

  const int64_t entries = tl.splits * layout.C;
  const int64_t counter_bytes = ceil_div(groups * int64_t(sizeof(int)), 16) * 16;
  // 16-byte aligned (the caching allocator's blocks are 512-byte aligned)
  char* base = static_cast<char*>(workspace.allocate(counter_bytes + Staging::bytes(entries)));
  int* counters = reinterpret_cast<int*>(base);
  C10_CUDA_CHECK(cudaMemsetAsync(counters, 0, counter_bytes, stream));
  const Staging ws = Staging::carve(base + counter_bytes, entries);

  reduce_kernel<T, L, kRows, Op>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(op, tl, ws, counters);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Elementwise skeleton. Op provides:
//   kUnroll                                         accesses per thread per tile
//   struct Coef;  Coef coef(c)                      per-channel coefficients
//   template <int L> struct Item;  load<L>(Item&, off)
//   apply<L, LC>(const Coef (&)[LC], const Item<L>&, off)   LC = L (rows: a channel per lane)
//                                                           or 1 (planes: one channel)

template <typename T, int L, bool kRows, typename Op>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) apply_kernel(const Op op, const Tiling tl) {
  using Coef = typename Op::Coef;
  using Item = typename Op::template Item<L>;
  constexpr int U = Op::kUnroll;

  const int tx = threadIdx.x & ((1 << tl.bx_shift) - 1);
  const int ty = threadIdx.x >> tl.bx_shift;

  if constexpr (kRows) {
    const int64_t ct = blockIdx.x % tl.tiles_inner;
    const int64_t v = ct * (int64_t(1) << tl.bx_shift) + tx;
    if (v >= tl.inner_v) {
      return;
    }
    Coef coef[L];
#pragma unroll
    for (int j = 0; j < L; ++j) {
      coef[j] = op.coef(v * L + j);
    }
    for (int64_t to = blockIdx.x / tl.tiles_inner; to < tl.tiles_outer; to += tl.splits) {
      Item item[U];
      int64_t off[U];
      bool ok[U];
#pragma unroll
      for (int k = 0; k < U; ++k) {
        int64_t o, vv;
        tile_access(tl, to, ct, k, tx, ty, o, vv);
        ok[k] = o < tl.outer;
        off[k] = o * tl.inner + v * L;
        if (ok[k]) {
          op.template load<L>(item[k], off[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < U; ++k) {
        if (ok[k]) {
          op.template apply<L, L>(coef, item[k], off[k]);
        }
      }
    }
  } else {
    const int64_t tiles = tl.tiles_outer * tl.tiles_inner;
    const int ui_mask = (1 << tl.ui_shift) - 1;
    for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
      const int64_t to = t / tl.tiles_inner;
      const int64_t ti = t % tl.tiles_inner;
      Item item[U];
      int64_t plane[U];
      int64_t off[U];
      bool ok[U];
#pragma unroll
      for (int k = 0; k < U; ++k) {
        int64_t v;
        tile_access(tl, to, ti, k, tx, ty, plane[k], v);
        ok[k] = plane[k] < tl.outer && v < tl.inner_v;
        off[k] = plane[k] * tl.inner + v * L;
        if (ok[k]) {
          op.template load<L>(item[k], off[k]);
        }
      }
      // Accesses k with the same k >> ui_shift share a plane, so its coefficients.
      Coef coef[U];
#pragma unroll
      for (int k = 0; k < U; ++k) {
        if ((k & ui_mask) == 0) {
          coef[k] = plane[k] < tl.outer ? op.coef(plane[k] % tl.C) : Coef{};
        } else {
          coef[k] = coef[k > 0 ? k - 1 : 0];
        }
      }
#pragma unroll
      for (int k = 0; k < U; ++k) {
        if (ok[k]) {
          const Coef one[1] = {coef[k]};
          op.template apply<L, 1>(one, item[k], off[k]);
        }
      }
    }
  }
}

template <typename T, int L, bool kRows, typename Op>
void run_apply(const Op& op, const Layout& layout, cudaStream_t stream) {
  const int64_t target = wave_blocks<&apply_kernel<T, L, kRows, Op>>();
  int64_t blocks;
  Tiling tl;
  if (kRows) {
    tl = plan_rows(layout.N * layout.S, layout.C, L, Op::kUnroll);
    tl.splits = std::min(std::max<int64_t>(target / tl.tiles_inner, 1), tl.tiles_outer);
    blocks = tl.tiles_inner * tl.splits;
  } else {
    tl = plan_planes(layout.N * layout.C, layout.C, layout.S, L, Op::kUnroll);
    tl.splits = std::min(tl.tiles_outer * tl.tiles_inner, target);
    blocks = tl.splits;
  }
  TORCH_CHECK(blocks <= int64_t(INT32_MAX), "fused_resnet: too many channels (", layout.C, ")");
  apply_kernel<T, L, kRows, Op><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(op, tl);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

} // namespace fused_resnet::cuda
