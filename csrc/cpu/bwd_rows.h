// The backward over the rows layout [N*S][C]: per-position sums over register tiles, merged in
// chunk order, and the apply pass over each thread's chunk; dz as in bwd_spans.h (activation Fn,
// residual flag kRes). A piecewise-linear activation's side comes from out, from the bits
// bn_act_fwd_train saved, or from bits the reduce pass records for the apply pass (RowMask).
#pragma once

#include <ATen/Parallel.h>

#include "bwd_spans.h"
#include "plans.h"
#include "act_mask.h"
#include "vec.h"

#include <memory>
#include <type_traits>
#include <vector>

namespace fused_resnet::cpu {

// ------------------------------------------------------------------------------------------
// Rows layout.

// Where the rows reduce pass takes dz from: what the activation reads (out, z or nothing:
// dz_of; kNone), out while recording the bits of its side for the apply pass (kOutRecord), or
// the bits bn_act_fwd_train saved (kSavedBits); the last two for a piecewise-linear activation.
enum class MaskSource { kNone, kOutRecord, kSavedBits };

// Per-position Σdz and Σdz·(x − mean) of a tile of NS vector steps (positions [j, j + NS*K))
// over rows [r0, r0 + nr), row g at element g·stride; added to sum_dz/sum_dz_xmu (the block
// total goes in in one add). mean, zscale, zshift: per position.
// The mask bits of the vector at element e are byte e / 8 of saved (kSavedBits) or of record
// (kOutRecord, written here).
template <typename T, typename Fn, bool kRes, int64_t NS, MaskSource kSrc, bool kKeepDz>
C10_ALWAYS_INLINE void rows_reduce_tile(
    const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x,
    const T* __restrict__ r, int64_t stride, int64_t r0, int64_t nr, int64_t j,
    const acc_type<T>* __restrict__ mean, const acc_type<T>* __restrict__ zscale,
    const acc_type<T>* __restrict__ zshift, acc_type<T>* __restrict__ sum_dz,
    acc_type<T>* __restrict__ sum_dz_xmu, const MaskWord* __restrict__ saved,
    MaskWord* __restrict__ record, T* __restrict__ dz_out, const Fn& act) {
  using V = VecT<T>;
  using A = typename V::acc_t;
  using AV = typename V::AV;
  constexpr int64_t K = V::kStep;
  constexpr int64_t P = V::kParts;
  constexpr int64_t H = AV::size();
  constexpr int64_t NA = NS * P;
  static_assert(kSrc == MaskSource::kNone || Fn::kReadsOut, "bits of a piecewise-linear side");
  const AV zero(A(0));
  AV sd[NA], sx[NA];
  FR_UNROLL
  for (int64_t i = 0; i < NA; ++i) {
    sd[i] = zero;
    sx[i] = zero;
  }
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t o = (r0 + i) * stride + j;
    FR_UNROLL
    for (int64_t u = 0; u < NS; ++u) {
      AV g[P], ov[P], xv[P], rv[P];
      V::load(dy + o + u * K, g);
      if constexpr (Fn::kReadsOut && kSrc != MaskSource::kSavedBits) {
        V::load(y + o + u * K, ov);
      }
      V::load(x + o + u * K, xv);
      if constexpr (kRes) {
        V::load(r + o + u * K, rv);
      }
      FR_UNROLL
      for (int64_t q = 0; q < P; ++q) {
        const int64_t e = o + u * K + q * H;
        const int64_t t = j + u * K + q * H;
        const AV xm = xv[q] - AV::loadu(mean + t);
        AV dz;
        if constexpr (kSrc == MaskSource::kSavedBits) {
          dz = act.grad_off(g[q], lanes_from_bits(saved[e / 8]));
        } else if constexpr (kSrc == MaskSource::kOutRecord) {
          const AV off = act.off(ov[q]);
          record[e / 8] = lane_bits(off);
          dz = act.grad_off(g[q], off);
        } else {
          dz = dz_of<kRes>(
              act, g[q], ov[q], xm, AV::loadu(zscale + t), AV::loadu(zshift + t), rv[q]);
        }
        if constexpr (kKeepDz) {
          dz.store(dz_out + e);
        }
        sd[u * P + q] = sd[u * P + q] + dz;
        sx[u * P + q] = at::vec::fmadd(dz, xm, sx[u * P + q]);
      }
    }
  }
  FR_UNROLL
  for (int64_t i = 0; i < NA; ++i) {
    const int64_t t = j + i * H;
    (AV::loadu(sum_dz + t) + sd[i]).store(sum_dz + t);
    (AV::loadu(sum_dz_xmu + t) + sx[i]).store(sum_dz_xmu + t);
  }
}

// The side of a piecewise-linear activation in the rows path, as bits (act_mask.h), for the
// super-rows when rows_keep_mask (leftover rows, other widths and other builds read out). The
// apply pass needs dz (for relu (out <= 0) ? 0 : dy) for every element after the reduce pass
// has streamed dy, out and x through the caches; with the bits it reads dy, x and the bits
// (2 + 1/32 operands) instead of dy, out and x (3).
//   saved:  act_mask from bn_act_fwd_train; the reduce pass reads it too, so out is not read
//           at all (the training backward).
//   record: otherwise (bn_act_bwd after the eval forward), the reduce pass records the bits
//           from out for the apply pass, into a buffer of the calling thread that only grows:
//           a buffer of a few hundred KB allocated per call lies above glibc's mmap threshold,
//           so it would be mapped, page-faulted and unmapped on every call.
// Bits instead of out: the apply pass (and, with saved bits, the reduce pass too) reads 1 bit
// per element instead of an activation (benchmarks/NOTES.md has the measurements).
struct RowMask {
  const MaskWord* saved = nullptr;
  MaskWord* record = nullptr;
  // reads the bits of the apply pass
  const MaskWord* bits() const { return saved != nullptr ? saved : record; }
};

template <typename T, typename Fn>
RowMask row_mask(const RowPlan& plan, const MaskWord* saved) {
  RowMask m;
  if (!rows_keep_mask<T, Fn>(plan)) {
    return m;
  }
  if (saved != nullptr) {
    m.saved = saved;
    return m;
  }
  // every byte is written by the reduce pass before the apply pass reads it
  thread_local std::vector<MaskWord> buffer;
  const size_t count = static_cast<size_t>(plan.G * plan.W / 8);
  if (buffer.size() < count) {
    buffer.resize(count);
  }
  m.record = buffer.data();
  return m;
}

// Per-channel values repeated over a super-row (width W): the means, z's scale and shift.
template <typename A>
struct RowParams {
  std::vector<A> mean, zscale, zshift;
};

template <typename T>
RowParams<acc_type<T>> repeated_params(const BwdArgs<T>& a, const RowPlan& plan) {
  RowParams<acc_type<T>> p;
  p.mean.assign(a.mean, a.mean + a.C);
  p.zscale.assign(a.zscale, a.zscale + a.C);
  p.zshift.assign(a.zshift, a.zshift + a.C);
  repeat_channels(p.mean, a.C, plan.W);
  repeat_channels(p.zscale, a.C, plan.W);
  repeat_channels(p.zshift, a.C, plan.W);
  return p;
}

// Per-position sums over super-rows [g0, g1) of width W, in blocks of kRowBlock rows, a
// piecewise-linear activation's side taken as `mask` says (RowMask; W is then a multiple of the
// vector step): Σdz into sum_dz, Σdz·(x − mean) into sum_dz_xmu (double, W each). Block totals
// go into acc_t partial sums (part_sum_dz, part_sum_dz_xmu: W each), which are added into the
// double sums every kFlushBlocks blocks (see Sums). pp: the per-position parameters. Row g
// starts at element g·stride (stride = W in the rows layout; the short planes' blocks of
// channels are narrower than the sample that holds them).
template <typename T, typename Fn, bool kRes, bool kKeepDz>
void rows_chunk_sums(
    const T* dy, const T* y, const T* x, const T* r, int64_t W, int64_t stride, int64_t g0,
    int64_t g1, const RowParams<acc_type<T>>& pp, double* sum_dz, double* sum_dz_xmu,
    acc_type<T>* part_sum_dz, acc_type<T>* part_sum_dz_xmu, const RowMask& mask, T* dz_out,
    const Fn& act) {
  using V = VecT<T>;
  using A = typename V::acc_t;
  constexpr int64_t K = V::kStep;
  constexpr int64_t NS = kTileVectors / V::kParts;
  constexpr int64_t kFlushBlocks = 4;
  constexpr bool kBits = kMaskable<T, Fn>;
  const int64_t Wv = W / K * K;
  const A* mean = pp.mean.data();
  const A* zscale = pp.zscale.data();
  const A* zshift = pp.zshift.data();
  std::fill(sum_dz, sum_dz + W, 0.0);
  std::fill(sum_dz_xmu, sum_dz_xmu + W, 0.0);
  std::fill(part_sum_dz, part_sum_dz + W, A(0));
  std::fill(part_sum_dz_xmu, part_sum_dz_xmu + W, A(0));
  auto flush = [&] {
    for (int64_t t = 0; t < W; ++t) {
      sum_dz[t] += static_cast<double>(part_sum_dz[t]);
      sum_dz_xmu[t] += static_cast<double>(part_sum_dz_xmu[t]);
      part_sum_dz[t] = A(0);
      part_sum_dz_xmu[t] = A(0);
    }
  };
  int64_t blocks = 0;
  for (int64_t gb = g0; gb < g1; gb += kRowBlock) {
    const int64_t nb = std::min(kRowBlock, g1 - gb);
    if (blocks++ == kFlushBlocks) {
      flush();
      blocks = 1;
    }
    // the whole vectors of the block's rows, positions [0, Wv), the mask from `source`
    auto tiles = [&](auto source) {
      constexpr MaskSource kSrc = decltype(source)::value;
      int64_t t = 0;
      for (; t + NS * K <= Wv; t += NS * K) {
        rows_reduce_tile<T, Fn, kRes, NS, kSrc, kKeepDz>(
            dy, y, x, r, stride, gb, nb, t, mean, zscale, zshift, part_sum_dz, part_sum_dz_xmu,
            mask.saved, mask.record, dz_out, act);
      }
      for (; t < Wv; t += K) {
        rows_reduce_tile<T, Fn, kRes, 1, kSrc, kKeepDz>(
            dy, y, x, r, stride, gb, nb, t, mean, zscale, zshift, part_sum_dz, part_sum_dz_xmu,
            mask.saved, mask.record, dz_out, act);
      }
    };
    using Src = MaskSource;
    if (kBits && mask.saved != nullptr) {  // (row_mask keeps none for other types, activations)
      tiles(std::integral_constant<Src, kBits ? Src::kSavedBits : Src::kNone>{});
    } else if (kBits && mask.record != nullptr) {
      tiles(std::integral_constant<Src, kBits ? Src::kOutRecord : Src::kNone>{});
    } else {
      tiles(std::integral_constant<Src, Src::kNone>{});
    }
    for (int64_t j = Wv; j < W; ++j) {  // positions past the last full vector (k == 1, C % K != 0)
      A bd = A(0), bx = A(0);
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t e = (gb + i) * stride + j;
        const A xm = static_cast<A>(x[e]) - mean[j];
        const A dz = dz_at<kRes>(act, dy, y, r, e, xm, zscale[j], zshift[j]);
        if constexpr (kKeepDz) {
          dz_out[e] = dz;
        }
        bd += dz;
        bx += dz * xm;
      }
      part_sum_dz[j] += bd;
      part_sum_dz_xmu[j] += bx;
    }
  }
  flush();
}

// Per-channel sums of the rows layout: chunk sums in parallel (per position, then the k positions
// of each channel folded), added in chunk order, then the leftover rows. pp: the per-channel
// values repeated over a super-row. mask: where the super-rows' side of a piecewise-linear
// activation comes from (RowMask).
template <typename T, typename Fn, bool kRes, bool kKeepDz = false>
void rows_sums(
    const BwdArgs<T>& a, const RowPlan& plan, const RowParams<acc_type<T>>& pp, Sums* out,
    const Fn& act, const RowMask& mask = RowMask{}, T* dz_out = nullptr) {
  static_assert(!kKeepDz || std::is_same_v<T, acc_type<T>>, "dz is kept in the accumulation type");
  using A = acc_type<T>;
  const int64_t C = plan.C, k = plan.k, W = plan.W, P = plan.P;
  std::vector<Sums> part(P * C);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    std::vector<double> totals(2 * W);
    std::vector<A> partials(2 * W);
    double* sum_dz = totals.data();
    double* sum_dz_xmu = sum_dz + W;
    for (int64_t p = p0; p < p1; ++p) {
      rows_chunk_sums<T, Fn, kRes, kKeepDz>(
          a.dy, a.y, a.x, a.r, W, W, plan.chunk_begin(p), plan.chunk_end(p), pp, sum_dz,
          sum_dz_xmu, partials.data(), partials.data() + W, mask, dz_out, act);
      for (int64_t c = 0; c < C; ++c) {  // fold the k positions of each channel
        Sums s;
        for (int64_t q = 0; q < k; ++q) {
          s.sum_dz += sum_dz[q * C + c];
          s.sum_dz_xmu += sum_dz_xmu[q * C + c];
        }
        part[p * C + c] = s;
      }
    }
  });

  add_chunk_sums(part, P, C, out);
  if (plan.Rl > 0) {  // leftover rows (k > 1 only), added after the chunks
    for (int64_t c = 0; c < C; ++c) {
      const int64_t o = plan.G * W + c;
      for (int64_t i = 0; i < plan.Rl; ++i) {
        const int64_t e = o + i * C;
        const A xm = static_cast<A>(a.x[e]) - a.mean[c];
        const A dz = dz_at<kRes>(act, a.dy, a.y, a.r, e, xm, a.zscale[c], a.zshift[c]);
        if constexpr (kKeepDz) {
          dz_out[e] = dz;
        }
        out[c].sum_dz += dz;
        out[c].sum_dz_xmu += dz * xm;
      }
    }
  }
}

// Per-position coefficient arrays of a super-row (width W) from per-channel ones.
template <typename A>
struct RowCoefs {
  std::vector<A> a, b, d;
  RowCoefs(const std::vector<Coef<A>>& coef, int64_t W) {
    const int64_t C = static_cast<int64_t>(coef.size());
    a.resize(C);
    b.resize(C);
    d.resize(C);
    for (int64_t c = 0; c < C; ++c) {
      a[c] = coef[c].a;
      b[c] = coef[c].b;
      d[c] = coef[c].d;
    }
    repeat_channels(a, C, W);
    repeat_channels(b, C, W);
    repeat_channels(d, C, W);
  }
};

// Apply over every chunk, chunk p by thread p (the static partition of rows_sums). mask: the
// super-rows' bits of a piecewise-linear activation's side (RowMask::bits), or null.
template <typename T, typename Fn, bool kRes, typename F>
void rows_apply(
    const BwdArgs<T>& a, const RowPlan& plan, const RowCoefs<acc_type<T>>& k,
    const RowParams<acc_type<T>>& pp, const Fn& act, const MaskWord* mask = nullptr) {
  auto apply = [&](int64_t o, int64_t len, auto use_mask) {
    constexpr bool kMask = decltype(use_mask)::value;
    apply_span<T, Fn, kRes, F, true, kMask>(
        a.stream, a.dx + o, F::kResGrad ? a.dr + o : nullptr, a.dy + o, at_offset(a.y, o), a.x + o,
        at_offset(a.r, o), len, k.a.data(), k.b.data(), pp.mean.data(), k.d.data(),
        pp.zshift.data(), act, kMask ? mask + o / 8 : nullptr);
  };
  auto apply_rows = [&](int64_t g0, int64_t g1, auto use_mask) {
    for (int64_t g = g0; g < g1; ++g) {
      apply(g * plan.W, plan.W, use_mask);
    }
  };
  at::parallel_for(0, plan.P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      bool masked = false;
      if constexpr (kMaskable<T, Fn>) {
        if (mask != nullptr) {
          apply_rows(plan.chunk_begin(p), plan.chunk_end(p), std::true_type{});
          masked = true;
        }
      }
      if (!masked) {
        apply_rows(plan.chunk_begin(p), plan.chunk_end(p), std::false_type{});
      }
      if (p == plan.P - 1 && plan.Rl > 0) {
        apply(plan.G * plan.W, plan.Rl * plan.C, std::false_type{});
      }
    }
    if (a.stream) {
      stream_fence();
    }
  });
}

} // namespace fused_resnet::cpu
