// The backward over the planes layout when its planes are short (S < kShortPlane: a small
// input's last stages, 4x4, 2x2): plane by plane, each pass would pay a span's setup and the
// reduction of its accumulators for a few vectors (bn_silu 4x672x4x4 training took 1.6x eager's
// time). A sample's C·S values are one row instead, each channel's values repeated over its S
// positions: the rows layout's reduce tiles (rows_chunk_sums) over chunks of samples, their
// per-position sums folded per channel in a fixed order, and the apply a sample at a time.
// bn_act_bwd and SyncBatchNorm's pieces both take this path, so that their sums agree bit for bit.
#pragma once

#include "bwd_rows.h"

#include <algorithm>
#include <vector>

namespace fused_resnet::cpu {

// The per-position mean, z's scale and shift of a sample's row.
template <typename T>
RowParams<acc_type<T>> short_plane_params(const BwdArgs<T>& a) {
  RowParams<acc_type<T>> pp;
  pp.mean = repeat_each(a.mean, a.C, a.S);
  pp.zscale = repeat_each(a.zscale, a.C, a.S);
  pp.zshift = repeat_each(a.zshift, a.C, a.S);
  return pp;
}

// Per-channel Σdz and Σdz·(x − mean): chunks of samples in parallel (one per thread, of at least
// kParallelMinElems elements), each folded per channel, then added in chunk order.
template <typename T, typename Fn, bool kRes>
void short_planes_sums(
    const BwdArgs<T>& a, const RowParams<acc_type<T>>& pp, Sums* out, const Fn& act) {
  using A = acc_type<T>;
  const int64_t N = a.N, C = a.C, S = a.S, W = C * S;
  const int64_t P = std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), N, N * W / kParallelMinElems}));
  std::vector<Sums> part(P * C);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    std::vector<double> totals(2 * W);
    std::vector<A> partials(2 * W);
    for (int64_t p = p0; p < p1; ++p) {
      rows_chunk_sums<T, Fn, kRes, false>(
          a.dy, a.y, a.x, a.r, W, N * p / P, N * (p + 1) / P, pp, totals.data(),
          totals.data() + W, partials.data(), partials.data() + W, RowMask{}, nullptr, act);
      for (int64_t c = 0; c < C; ++c) {
        Sums s;
        for (int64_t q = c * S; q < (c + 1) * S; ++q) {
          s.sum_dz += totals[q];
          s.sum_dz_xmu += totals[W + q];
        }
        part[p * C + c] = s;
      }
    }
  });
  add_chunk_sums(part, P, C, out);
}

// dx (and dr) a sample at a time, from per-channel coefficients.
template <typename T, typename Fn, bool kRes, typename F>
void short_planes_apply(
    const BwdArgs<T>& a, const RowParams<acc_type<T>>& pp, const Coef<acc_type<T>>* coef,
    const Fn& act) {
  using A = acc_type<T>;
  const int64_t N = a.N, C = a.C, S = a.S, W = C * S;
  std::vector<A> ka(C), kb(C), kd(C);
  for (int64_t c = 0; c < C; ++c) {
    ka[c] = coef[c].a;
    kb[c] = coef[c].b;
    kd[c] = coef[c].d;
  }
  const std::vector<A> cA = repeat_each(ka.data(), C, S);
  const std::vector<A> cB = repeat_each(kb.data(), C, S);
  const std::vector<A> cD = repeat_each(kd.data(), C, S);
  const int64_t grain = std::max<int64_t>(1, kParallelMinElems / W);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t o = n * W;
      apply_span<T, Fn, kRes, F, true>(
          a.stream, a.dx + o, F::kResGrad ? a.dr + o : nullptr, a.dy + o, at_offset(a.y, o),
          a.x + o, at_offset(a.r, o), W, cA.data(), cB.data(), pp.mean.data(), cD.data(),
          pp.zshift.data(), act);
    }
    if (a.stream) {
      stream_fence();
    }
  });
}

} // namespace fused_resnet::cpu
