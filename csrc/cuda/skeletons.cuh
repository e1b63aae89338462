// Kernel skeletons of the CUDA backend, shared by the four kernel files:
//
//   reduce_kernel  per-channel reductions (statistics, backward sums), one launch:
//                  per-thread accumulation -> warp shuffles -> shared-memory merge -> each block's
//                  partial to a staging buffer -> the last block of a channel group (atomic
//                  counter) merges the partials in a fixed order and writes the result.
//   apply_kernel   elementwise passes with per-channel coefficients (forward apply, eval,
//                  backward apply); apply_flat_kernel the same passes over planes whose length
//                  is not a multiple of the access width (launch_apply chooses).
//
// An op (StatsOp, BwdReduceOp in the .cu files; FwdApplyOp, BwdApplyOp) supplies what is loaded
// and how it is combined; the skeleton supplies the tiling (tiling.cuh), the vector accesses
// (access.cuh) and the merges (reduce_state.cuh).
#pragma once

#include "access.cuh"
#include "reduce_state.cuh"
#include "static_switch.h"
#include "tiling.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

namespace fused_resnet::cuda {

// ---------------------------------------------------------------------------------------------
// Reduction skeleton. Op provides:
//   kUnroll                         accesses per thread per tile
//   template <int L> using State;   Moments<A, L> or Sums<A, L>
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
    const State1 m = block_merge(collapse_lanes(st), 1, smem1);
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
void run_reduce(const Op& op, const ViewDims& dims, Workspace& workspace, cudaStream_t stream) {
  using Staging = typename Op::template State<1>::Staging;
  Tiling tl = kRows ? plan_rows(dims.N * dims.S, dims.C, L, Op::kUnroll)
                    : plan_planes(dims.N, dims.C, dims.S, L, Op::kUnroll);
  const int64_t groups = kRows ? tl.tiles_inner : dims.C;
  const int64_t tiles = kRows ? tl.tiles_outer : tl.tiles_outer * tl.tiles_inner;
  const int64_t target = wave_blocks<&reduce_kernel<T, L, kRows, Op>>();
  // blocks per group: as many as fill one wave without starting a second (at least one)
  const int64_t want = std::min(std::max<int64_t>(target / groups, 1), tiles);
  tl.tiles_per_split = ceil_div(tiles, want);
  tl.splits = ceil_div(tiles, tl.tiles_per_split);
  const int64_t blocks = groups * tl.splits;
  TORCH_CHECK(blocks <= int64_t(INT32_MAX), "fused_resnet: too many channels (", dims.C, ")");

  const int64_t entries = tl.splits * dims.C;
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
void run_apply(const Op& op, const ViewDims& dims, cudaStream_t stream) {
  const int64_t target = wave_blocks<&apply_kernel<T, L, kRows, Op>>();
  int64_t blocks;
  Tiling tl;
  if (kRows) {
    tl = plan_rows(dims.N * dims.S, dims.C, L, Op::kUnroll);
    tl.splits = std::min(std::max<int64_t>(target / tl.tiles_inner, 1), tl.tiles_outer);
    blocks = tl.tiles_inner * tl.splits;
  } else {
    tl = plan_planes(dims.N * dims.C, dims.C, dims.S, L, Op::kUnroll);
    tl.splits = std::min(tl.tiles_outer * tl.tiles_inner, target);
    blocks = tl.splits;
  }
  TORCH_CHECK(blocks <= int64_t(INT32_MAX), "fused_resnet: too many channels (", dims.C, ")");
  apply_kernel<T, L, kRows, Op><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(op, tl);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Flat apply: planes of S elements, S not a multiple of L = 16 bytes / sizeof(T) (a 14x14 or 7x7
// plane in 16-bit types, 7x7 in float32). On the planes path each access of such a view is one
// element, so a thread has 1/L of the bytes in flight that covering DRAM latency needs (the
// first GPU run: NCHW 64x1024x14x14 bf16 eval at 13% of copy bandwidth, 64x2048x7x7 at 11%).
// Here the view is what it is in memory, N*C*S contiguous elements, read in L-element vectors
// from 16-byte-aligned pointers; with S >= L a vector spans at most two planes, p = off / S and
// p + 1, so it takes both planes' coefficients and picks per lane (off + j < (p + 1)·S: plane p).
// The last numel % L elements are applied one by one by block 0. Same reads and writes as the
// planes path: each element once. Index arithmetic in 32 bits below 2**31 elements (a 64-bit
// division costs several times a 32-bit one), in 64 bits above.

struct FlatTiling {
  int64_t C, S;
  int64_t numel;
  bool index32;  // numel < 2**31
};

template <typename T, int L, typename Op>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    apply_flat_kernel(const Op op, const FlatTiling f) {
  using Coef = typename Op::Coef;
  using Item = typename Op::template Item<L>;
  constexpr int U = Op::kUnroll;
  const auto plane_of = [&](int64_t e) -> int64_t {
    return f.index32 ? int64_t(uint32_t(e) / uint32_t(f.S)) : e / f.S;
  };
  const auto channel_of = [&](int64_t plane) -> int64_t {
    return f.index32 ? int64_t(uint32_t(plane) % uint32_t(f.C)) : plane % f.C;
  };
  const int64_t vectors = f.numel / L;
  const int64_t step = int64_t(gridDim.x) * kThreads * U;
  for (int64_t first = int64_t(blockIdx.x) * kThreads * U + threadIdx.x; first < vectors;
       first += step) {
    Item item[U];
    int64_t off[U];
    bool ok[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int64_t v = first + int64_t(k) * kThreads;
      ok[k] = v < vectors;
      off[k] = v * L;
      if (ok[k]) {
        op.template load<L>(item[k], off[k]);
      }
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      if (ok[k]) {
        const int64_t p = plane_of(off[k]);
        const int64_t next = (p + 1) * f.S;  // the first element of plane p + 1
        const Coef here = op.coef(channel_of(p));
        // p + 1 exists when the vector reaches it: off + L <= numel = (last plane + 1)·S
        const Coef there = off[k] + L > next ? op.coef(channel_of(p + 1)) : here;
        Coef coef[L];
#pragma unroll
        for (int j = 0; j < L; ++j) {
          coef[j] = off[k] + j < next ? here : there;
        }
        op.template apply<L, L>(coef, item[k], off[k]);
      }
    }
  }
  if (blockIdx.x == 0) {
    const int64_t e = vectors * L + threadIdx.x;  // the tail: fewer than L elements
    if (e < f.numel) {
      typename Op::template Item<1> one;
      op.template load<1>(one, e);
      const Coef coef[1] = {op.coef(channel_of(plane_of(e)))};
      op.template apply<1, 1>(coef, one, e);
    }
  }
}

template <typename T, typename Op>
void run_apply_flat(const Op& op, const ViewDims& dims, cudaStream_t stream) {
  constexpr int L = vec_lanes<T>();
  const FlatTiling f{dims.C, dims.S, dims.numel(), dims.numel() < (int64_t(1) << 31)};
  const int64_t per_block = int64_t(kThreads) * Op::kUnroll;  // vectors a block covers a round
  const int64_t blocks = std::max<int64_t>(
      std::min(ceil_div(f.numel / L, per_block), wave_blocks<&apply_flat_kernel<T, L, Op>>()), 1);
  apply_flat_kernel<T, L, Op><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(op, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether an apply pass over `dims` takes the flat path: NCHW planes whose length S is not a
// multiple of L (the planes path would read them an element at a time) but at least L (a vector
// then spans at most two planes), every pointer 16-byte aligned.
template <typename T>
bool flat_apply_ok(const ViewDims& dims, std::initializer_list<const void*> activations) {
  constexpr int L = vec_lanes<T>();
  return !dims.rows && dims.S % L != 0 && dims.S >= L && aligned_16(activations);
}

// ---------------------------------------------------------------------------------------------
// A launcher's dispatch: calls launch(std::integral_constant<int, L>{}, std::bool_constant<kRows>{})
// for the view's layout and the widest access L its activations allow (vector_ok: 16 bytes
// wherever the row length and every pointer allow it, else one element).
template <typename T, typename Launch>
void launch_for_view(const ViewDims& dims, std::initializer_list<const void*> activations,
                     const Launch& launch) {
  const bool vec = vector_ok<T>(dims.rows ? dims.C : dims.S, activations);
  FR_BOOL_SWITCH(dims.rows, kRows, [&] {
    FR_BOOL_SWITCH(vec, kVec, [&] {
      launch(std::integral_constant<int, kVec ? vec_lanes<T>() : 1>{}, std::bool_constant<kRows>{});
    });
  });
}

// An apply pass's dispatch: the flat path where flat_apply_ok, else run_apply for the view's
// layout and access width.
template <typename T, typename Op>
void launch_apply(const Op& op, const ViewDims& dims,
                  std::initializer_list<const void*> activations, cudaStream_t stream) {
  if (flat_apply_ok<T>(dims, activations)) {
    run_apply_flat<T>(op, dims, stream);
    return;
  }
  launch_for_view<T>(dims, activations, [&](auto lanes, auto rows) {
    run_apply<T, decltype(lanes)::value, decltype(rows)::value>(op, dims, stream);
  });
}

} // namespace fused_resnet::cuda
