// The statistics pass: per-channel moments of an input in its layout, for the training forward
// and bn_stats (the same code, so the same bits). Each block of at most kBlockBytes of a channel
// is reduced exactly by two passes over L1-resident data (sum → block mean, then
// Σ(x − block mean)²); blocks, chunks and threads are combined with Chan's formula in a fixed
// order, so results are deterministic for a given thread count. Never E[x²] − E[x]².
#pragma once

#include <ATen/Parallel.h>

#include "common/contract.h"
#include "moments.h"
#include "plans.h"
#include "vec.h"

#include <vector>

namespace fused_resnet::cpu {

// ------------------------------------------------------------------------------------------
// Statistics of one contiguous span p[0, L), L > 0: exact two-pass in the accumulation type.

template <typename T>
Moments<acc_type<T>> span_moments(const T* p, int64_t L) {
  using V = VecT<T>;
  using A = typename V::acc_t;
  using AV = typename V::AV;
  constexpr int64_t K = V::kStep;
  constexpr int64_t P = V::kParts;
  constexpr int64_t U = 8 / P;  // K-steps per iteration: 8 independent accumulator chains
  constexpr int64_t NA = U * P;

  // pass 1: sum
  AV s[NA];
  FR_UNROLL
  for (int64_t i = 0; i < NA; ++i) {
    s[i] = AV(A(0));
  }
  int64_t j = 0;
  for (; j + U * K <= L; j += U * K) {
    FR_UNROLL
    for (int64_t u = 0; u < U; ++u) {
      AV a[P];
      V::load(p + j + u * K, a);
      FR_UNROLL
      for (int64_t q = 0; q < P; ++q) {
        s[u * P + q] = s[u * P + q] + a[q];
      }
    }
  }
  for (; j + K <= L; j += K) {
    AV a[P];
    V::load(p + j, a);
    FR_UNROLL
    for (int64_t q = 0; q < P; ++q) {
      s[q] = s[q] + a[q];
    }
  }
  A sum = hsum(sum_accumulators(s));
  for (int64_t t = j; t < L; ++t) {
    sum += static_cast<A>(p[t]);
  }
  const A mean = sum / A(L);

  // pass 2: centred squares (the block is in L1)
  const AV mv(mean);
  FR_UNROLL
  for (int64_t i = 0; i < NA; ++i) {
    s[i] = AV(A(0));
  }
  j = 0;
  for (; j + U * K <= L; j += U * K) {
    FR_UNROLL
    for (int64_t u = 0; u < U; ++u) {
      AV a[P];
      V::load(p + j + u * K, a);
      FR_UNROLL
      for (int64_t q = 0; q < P; ++q) {
        const AV d = a[q] - mv;
        s[u * P + q] = at::vec::fmadd(d, d, s[u * P + q]);
      }
    }
  }
  for (; j + K <= L; j += K) {
    AV a[P];
    V::load(p + j, a);
    FR_UNROLL
    for (int64_t q = 0; q < P; ++q) {
      const AV d = a[q] - mv;
      s[q] = at::vec::fmadd(d, d, s[q]);
    }
  }
  A m2 = hsum(sum_accumulators(s));
  for (int64_t t = j; t < L; ++t) {
    const A d = static_cast<A>(p[t]) - mean;
    m2 += d * d;
  }
  Moments<A> r;
  r.n = L;
  r.mean = mean;
  r.m2 = m2;
  return r;
}

template <typename T>
C10_ALWAYS_INLINE void accumulate_span(Moments<acc_type<T>>& m, const T* p, int64_t L) {
  constexpr int64_t kBlock = kBlockBytes / sizeof(T);
  const int64_t nblk = divup(L, kBlock);
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t lo = L * b / nblk;
    const int64_t hi = L * (b + 1) / nblk;
    merge_into(m, span_moments(p + lo, hi - lo));
  }
}

// Moments of planes-layout task t (part of one channel).
template <typename T>
Moments<acc_type<T>> task_moments(const T* x, const PlaneTasks& tasks, int64_t t) {
  Moments<acc_type<T>> m;
  tasks.for_each_span(t, [&](int64_t o, int64_t len) { accumulate_span(m, x + o, len); });
  return m;
}

// Per-channel moments of the planes layout: the tasks in parallel, then an ordered merge of
// each channel's parts.
template <typename T>
void planes_moments(const T* x, const PlaneTasks& tasks, Moments<acc_type<T>>* out) {
  std::vector<Moments<acc_type<T>>> part(tasks.count());
  at::parallel_for(0, tasks.count(), tasks.grain(), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      part[t] = task_moments(x, tasks, t);
    }
  });
  for (int64_t c = 0; c < tasks.C; ++c) {
    Moments<acc_type<T>> m;
    for (int64_t p = 0; p < tasks.P; ++p) {
      merge_into(m, part[c * tasks.P + p]);
    }
    out[c] = m;
  }
}

// ------------------------------------------------------------------------------------------
// Rows layout statistics. A block of nr rows (width W) is reduced per position, a register
// tile of NS vector steps at a time: sums → block means, then centred squares over the same
// (L1-resident) tile. Blocks merge into the chunk's per-position moments with Chan's formula
// (counts are uniform over positions, so the coefficients are scalars).

template <typename T, int64_t NS>
C10_ALWAYS_INLINE void rows_moments_tile(
    const T* __restrict__ x, int64_t stride, int64_t r0, int64_t nr, int64_t j,
    acc_type<T>* __restrict__ bmean, acc_type<T>* __restrict__ bm2) {
  using V = VecT<T>;
  using A = typename V::acc_t;
  using AV = typename V::AV;
  constexpr int64_t K = V::kStep;
  constexpr int64_t P = V::kParts;
  constexpr int64_t H = AV::size();
  constexpr int64_t NA = NS * P;
  AV s[NA];
  FR_UNROLL
  for (int64_t i = 0; i < NA; ++i) {
    s[i] = AV(A(0));
  }
  for (int64_t i = 0; i < nr; ++i) {
    const T* row = x + (r0 + i) * stride + j;
    FR_UNROLL
    for (int64_t u = 0; u < NS; ++u) {
      AV a[P];
      V::load(row + u * K, a);
      FR_UNROLL
      for (int64_t q = 0; q < P; ++q) {
        s[u * P + q] = s[u * P + q] + a[q];
      }
    }
  }
  const AV inv_n(A(1) / A(nr));
  AV m[NA];
  FR_UNROLL
  for (int64_t i = 0; i < NA; ++i) {
    m[i] = s[i] * inv_n;
    s[i] = AV(A(0));
  }
  for (int64_t i = 0; i < nr; ++i) {
    const T* row = x + (r0 + i) * stride + j;
    FR_UNROLL
    for (int64_t u = 0; u < NS; ++u) {
      AV a[P];
      V::load(row + u * K, a);
      FR_UNROLL
      for (int64_t q = 0; q < P; ++q) {
        const AV d = a[q] - m[u * P + q];
        s[u * P + q] = at::vec::fmadd(d, d, s[u * P + q]);
      }
    }
  }
  FR_UNROLL
  for (int64_t i = 0; i < NA; ++i) {
    m[i].store(bmean + j + i * H);
    s[i].store(bm2 + j + i * H);
  }
}

// Per-position moments of rows [g0, g1) of width W, row g at element g·stride (stride = W in
// the rows layout; the short planes' blocks of channels are narrower than their sample), into
// mean and m2 (W each; bmean, bm2: W each of scratch).
template <typename T>
void rows_chunk_moments(
    const T* x, int64_t W, int64_t stride, int64_t g0, int64_t g1, acc_type<T>* mean,
    acc_type<T>* m2, acc_type<T>* bmean, acc_type<T>* bm2) {
  using V = VecT<T>;
  using A = typename V::acc_t;
  constexpr int64_t K = V::kStep;
  constexpr int64_t NS = kTileVectors / V::kParts;
  const int64_t Wv = W / K * K;
  int64_t n = 0;
  for (int64_t gb = g0; gb < g1; gb += kRowBlock) {
    const int64_t nb = std::min(kRowBlock, g1 - gb);
    int64_t j = 0;
    for (; j + NS * K <= Wv; j += NS * K) {
      rows_moments_tile<T, NS>(x, stride, gb, nb, j, bmean, bm2);
    }
    for (; j < Wv; j += K) {
      rows_moments_tile<T, 1>(x, stride, gb, nb, j, bmean, bm2);
    }
    for (; j < W; ++j) {  // positions past the last full vector (k == 1, C % K != 0)
      A sum = A(0);
      for (int64_t i = 0; i < nb; ++i) {
        sum += static_cast<A>(x[(gb + i) * stride + j]);
      }
      const A bm = sum / A(nb);
      A q = A(0);
      for (int64_t i = 0; i < nb; ++i) {
        const A d = static_cast<A>(x[(gb + i) * stride + j]) - bm;
        q += d * d;
      }
      bmean[j] = bm;
      bm2[j] = q;
    }
    if (n == 0) {
      std::copy(bmean, bmean + W, mean);
      std::copy(bm2, bm2 + W, m2);
    } else {
      const A wb = A(nb) / A(n + nb);
      const A wab = A(n) * wb;
      for (int64_t t = 0; t < W; ++t) {
        const A delta = bmean[t] - mean[t];
        mean[t] += delta * wb;
        m2[t] += bm2[t] + delta * delta * wab;
      }
    }
    n += nb;
  }
}

// Per-channel moments of the rows layout: chunk partials in parallel (per position, then the k
// positions of each channel folded), merged in chunk order, then the leftover rows.
template <typename T>
void rows_moments(const T* x, const RowPlan& plan, Moments<acc_type<T>>* out) {
  using A = acc_type<T>;
  const int64_t C = plan.C, k = plan.k, W = plan.W, P = plan.P;

  // per-chunk, per-channel partials (count (g1-g0)*k, uniform over channels)
  std::vector<A> pmean(P * C), pm2(P * C);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    std::vector<A> scratch(4 * W);
    A* mean = scratch.data();
    A* m2 = mean + W;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t g0 = plan.chunk_begin(p), g1 = plan.chunk_end(p);
      if (g1 == g0) {
        continue;
      }
      rows_chunk_moments(x, W, W, g0, g1, mean, m2, m2 + W, m2 + 2 * W);
      // fold the k positions of each channel (equal counts g1 - g0)
      for (int64_t c = 0; c < C; ++c) {
        Moments<A> m;
        for (int64_t q = 0; q < k; ++q) {
          merge_into(m, g1 - g0, mean[q * C + c], m2[q * C + c]);
        }
        pmean[p * C + c] = m.mean;
        pm2[p * C + c] = m.m2;
      }
    }
  });

  for (int64_t c = 0; c < C; ++c) {
    Moments<A> m;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t count = (plan.chunk_end(p) - plan.chunk_begin(p)) * k;
      merge_into(m, count, pmean[p * C + c], pm2[p * C + c]);
    }
    if (plan.Rl > 0) {  // leftover rows (k > 1 only): exact two-pass, scalar
      const T* xl = x + plan.G * W + c;
      A s = A(0);
      for (int64_t i = 0; i < plan.Rl; ++i) {
        s += static_cast<A>(xl[i * C]);
      }
      const A lm = s / A(plan.Rl);
      A l2 = A(0);
      for (int64_t i = 0; i < plan.Rl; ++i) {
        const A d = static_cast<A>(xl[i * C]) - lm;
        l2 += d * d;
      }
      merge_into(m, plan.Rl, lm, l2);
    }
    out[c] = m;
  }
}

// Per-channel moments of the planes layout when its planes are short (S < kShortPlane): blocks
// of channels (ShortPlaneBlocks), a block's span of every sample as one row of the rows layout's
// tiles (per-position moments over the N samples), then each channel's S positions combined
// (combine_equal). A channel's moments come from one task, whatever the thread count.
template <typename T>
void short_planes_moments(
    const T* x, int64_t N, int64_t C, int64_t S, Moments<acc_type<T>>* out) {
  using A = acc_type<T>;
  const ShortPlaneBlocks blocks(N, C, S, kParallelMinElems);
  at::parallel_for(0, blocks.count, blocks.grain, [&](int64_t b0, int64_t b1) {
    const int64_t L = blocks.cb * S;  // the widest block
    std::vector<A> scratch(4 * L);
    A* mean = scratch.data();
    A* m2 = mean + L;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = blocks.begin(b), c1 = blocks.end(b);
      rows_chunk_moments(x + c0 * S, (c1 - c0) * S, C * S, 0, N, mean, m2, m2 + L, m2 + 2 * L);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t q = (c - c0) * S;
        out[c] = combine_equal(mean + q, m2 + q, S, N);
      }
    }
  });
}

// Per-channel moments of a non-empty input in its native layout.
template <typename T>
void channel_moments(const View& g, const T* x, Moments<acc_type<T>>* out) {
  const int64_t threads = at::get_num_threads();
  if (g.rows) {
    rows_moments(x, RowPlan(g.C, g.M(), VecT<T>::kStep, threads), out);
  } else if (g.S < kShortPlane<T>) {
    short_planes_moments(x, g.N, g.C, g.S, out);
  } else {
    planes_moments(x, PlaneTasks(g.N, g.C, g.S, threads), out);
  }
}

} // namespace fused_resnet::cpu
