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

} // namespace fused_resnet::cuda
