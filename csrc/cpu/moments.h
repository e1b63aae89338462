// Per-channel statistics as (count, mean, M2) partials, merged with Chan's formula.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <utility>

namespace fused_resnet::cpu {

// ---------------------------------------------------------------------------------------------
// (count, mean, M2) with Chan's pairwise merge: for partials a, b with n = na + nb,
//   δ = mean_b − mean_a,  mean = mean_a + δ·nb/n,  M2 = M2_a + M2_b + δ²·na·nb/n.

template <typename A>
struct Moments {
  int64_t n = 0;
  A mean = A(0);
  A m2 = A(0);
};

template <typename A>
C10_ALWAYS_INLINE void merge_into(Moments<A>& a, int64_t nb, A mean_b, A m2_b) {
  if (nb == 0) {
    return;
  }
  if (a.n == 0) {
    a.n = nb;
    a.mean = mean_b;
    a.m2 = m2_b;
    return;
  }
  const int64_t n = a.n + nb;
  const A wb = A(nb) / A(n);
  const A delta = mean_b - a.mean;
  a.mean += delta * wb;
  a.m2 += m2_b + delta * delta * A(a.n) * wb;
  a.n = n;
}

template <typename A>
C10_ALWAYS_INLINE void merge_into(Moments<A>& a, const Moments<A>& b) {
  merge_into(a, b.n, b.mean, b.m2);
}

// The moments of k partials of nb values each (means[q], m2s[q]) combined: mean = Σmean_q / k,
// M2 = ΣM2_q + nb·Σ(mean_q − mean)², the means' spread taken about their mean in a second pass
// (exact, as Chan's merge, without its division per partial).
template <typename A>
C10_ALWAYS_INLINE Moments<A> combine_equal(const A* means, const A* m2s, int64_t k, int64_t nb) {
  A sum = A(0);
  for (int64_t q = 0; q < k; ++q) {
    sum += means[q];
  }
  Moments<A> m;
  m.n = k * nb;
  m.mean = sum / A(k);
  A spread = A(0);
  for (int64_t q = 0; q < k; ++q) {
    const A d = means[q] - m.mean;
    spread += d * d;
    m.m2 += m2s[q];
  }
  m.m2 += A(nb) * spread;
  return m;
}

// (mean, biased variance) of merged moments; (0, 0) for an empty channel.
template <typename A>
C10_ALWAYS_INLINE std::pair<A, A> biased_mean_var(const Moments<A>& m) {
  const A mean = m.n > 0 ? m.mean : A(0);
  const A var = m.n > 0 ? m.m2 / A(m.n) : A(0);
  return {mean, var};
}

} // namespace fused_resnet::cpu
