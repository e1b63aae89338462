// The backward over the planes layout when its planes are short (S < kShortPlane: a small
// input's last stages, 4x4, 2x2): plane by plane, each pass would pay a span's setup and the
// reduction of its accumulators for a few vectors (bn_silu 4x672x4x4 training took 1.6x eager's
// time). The channels go in blocks of at most kShortPlaneBlock positions instead, as the forward's
// apply does (fwd.cpp): a block's per-position parameters (each channel's repeated over its S
// positions), then the block's span of every sample, contiguous, as one row of the rows layout's
// reduce tiles (rows_chunk_sums, at a stride of the sample) and its apply (apply_span). The
// blocks are the parallel tasks: a channel's sums come from one task over all N samples, folded
// over its S positions in order, so they do not depend on the thread count; bn_act_bwd and
// SyncBatchNorm's pieces both take this path, so that their sums agree bit for bit.
#pragma once

#include "bwd_rows.h"

#include <algorithm>
#include <vector>

namespace fused_resnet::cpu {

// Per-channel Σdz and Σdz·(x − mean); kKeepDz: dz written to dz_out too (laid out as dy).
template <typename T, typename Fn, bool kRes, bool kKeepDz = false>
void short_planes_sums(const BwdArgs<T>& a, Sums* out, const Fn& act, T* dz_out = nullptr) {
  using A = acc_type<T>;
  const int64_t N = a.N, S = a.S, W = a.C * a.S;
  const ShortPlaneBlocks blocks(N, a.C, S, kActParallelMinElems<Fn>);
  at::parallel_for(0, blocks.count, blocks.grain, [&](int64_t b0, int64_t b1) {
    const int64_t L = blocks.cb * S;  // the widest block
    RowParams<A> pp;
    pp.mean.resize(L);
    pp.zscale.resize(L);
    pp.zshift.resize(L);
    std::vector<double> totals(2 * L);
    std::vector<A> partials(2 * L);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = blocks.begin(b), c1 = blocks.end(b), o = c0 * S;
      repeat_block(pp.mean.data(), a.mean + c0, c1 - c0, S);
      repeat_block(pp.zscale.data(), a.zscale + c0, c1 - c0, S);
      repeat_block(pp.zshift.data(), a.zshift + c0, c1 - c0, S);
      const int64_t width = (c1 - c0) * S;
      rows_chunk_sums<T, Fn, kRes, kKeepDz>(
          a.dy + o, at_offset(a.y, o), a.x + o, at_offset(a.r, o), width, W, 0, N, pp,
          totals.data(), totals.data() + L, partials.data(), partials.data() + L, RowMask{},
          kKeepDz ? dz_out + o : nullptr, act);
      for (int64_t c = c0; c < c1; ++c) {  // fold the S positions of each channel, in order
        Sums s;
        for (int64_t q = (c - c0) * S; q < (c - c0 + 1) * S; ++q) {
          s.sum_dz += totals[q];
          s.sum_dz_xmu += totals[L + q];
        }
        out[c] = s;
      }
    }
  });
}

// dx (and dr) from per-channel coefficients.
template <typename T, typename Fn, bool kRes, typename F>
void short_planes_apply(const BwdArgs<T>& a, const Coef<acc_type<T>>* coef, const Fn& act) {
  using A = acc_type<T>;
  const int64_t N = a.N, S = a.S, W = a.C * a.S;
  const ShortPlaneBlocks blocks(N, a.C, S, kActParallelMinElems<Fn>);
  at::parallel_for(0, blocks.count, blocks.grain, [&](int64_t b0, int64_t b1) {
    const int64_t L = blocks.cb * S;
    std::vector<A> ka(blocks.cb), kb(blocks.cb), kd(blocks.cb);  // the block's coefficients
    std::vector<A> pa(L), pb(L), pd(L), mean(L), zshift(L);      // per position
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = blocks.begin(b), c1 = blocks.end(b);
      for (int64_t c = c0; c < c1; ++c) {
        ka[c - c0] = coef[c].a;
        kb[c - c0] = coef[c].b;
        kd[c - c0] = coef[c].d;
      }
      repeat_block(pa.data(), ka.data(), c1 - c0, S);
      repeat_block(pb.data(), kb.data(), c1 - c0, S);
      repeat_block(pd.data(), kd.data(), c1 - c0, S);
      repeat_block(mean.data(), a.mean + c0, c1 - c0, S);
      repeat_block(zshift.data(), a.zshift + c0, c1 - c0, S);
      const int64_t width = (c1 - c0) * S;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = n * W + c0 * S;
        apply_span<T, Fn, kRes, F, true>(
            a.stream, a.dx + o, F::kResGrad ? a.dr + o : nullptr, a.dy + o, at_offset(a.y, o),
            a.x + o, at_offset(a.r, o), width, pa.data(), pb.data(), mean.data(), pd.data(),
            zshift.data(), act);
      }
    }
    if (a.stream) {
      stream_fence();
    }
  });
}

} // namespace fused_resnet::cpu
