// Forward CPU kernels: bn_act_fwd_train (batch statistics) and bn_act_fwd_eval (running
// statistics), y = relu(x·scale + shift (+ r)) with per-channel scale = w·invstd and
// shift = b − mean·scale, computed in the accumulation type; and bn_stats, the statistics of
// bn_act_fwd_train alone (same code, so the same bits), for SyncBatchNorm.
//
// Statistics: each block of at most kBlockBytes of one channel is reduced exactly by two passes
// over L1-resident data (sum → block mean, then Σ(x − block mean)²); blocks, chunks and threads
// are combined with Chan's formula in a fixed order, so results are deterministic for a given
// thread count. Never E[x²] − E[x]².
//
// Planes layout [N][C][S]: when there are enough channels, one task owns a channel: it reduces
// the channel's N planes, then applies the normalization to them while they are still in L2, so
// the training forward reads x from memory once (the same traffic as eval). With few channels,
// each channel is split into P parts: partial moments, an ordered merge, then the apply pass
// over the same parts (same thread, same data).
// Rows layout [N*S][C]: each thread reduces a contiguous chunk of rows into per-position
// partials (vectorized along C), the chunks are merged in order, and each thread applies its
// own chunk; the training forward's apply also writes the ReLU mask bits (relu_mask, for
// bn_act_bwd: 1 bit per element instead of re-reading out).
#include "bn_act_cpu.h"

#include <ATen/ops/empty.h>

namespace fused_resnet::cpu {

namespace {

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
// Apply: y = relu(x·scale + shift (+ r)). kPerPos: scale/shift are per-element arrays (rows
// layout, indexed like the span); otherwise scale[0]/shift[0] are constants (planes layout).
// kMask: also writes the ReLU mask bits of the span (bn_act_cpu.h) to mask, whose byte 0 the
// span's element 0 starts; whole vectors then start on a byte (T computed in float).

template <typename T, bool kRes, bool kPerPos, bool kNT, bool kMask = false>
C10_ALWAYS_INLINE void fwd_apply_span(
    T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ r, int64_t L,
    const acc_type<T>* __restrict__ scale, const acc_type<T>* __restrict__ shift,
    MaskWord* __restrict__ mask = nullptr) {
  using V = VecT<T>;
  using A = typename V::acc_t;
  using AV = typename V::AV;
  constexpr int64_t K = V::kStep;
  constexpr int64_t P = V::kParts;
  constexpr int64_t H = AV::size();
  static_assert(!kMask || H == 8, "mask bytes hold the 8 lanes of a float vector");
  auto scalar = [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const A s = kPerPos ? scale[j] : scale[0];
      const A b = kPerPos ? shift[j] : shift[0];
      A z = std::fma(static_cast<A>(x[j]), s, b);
      if constexpr (kRes) {
        z += static_cast<A>(r[j]);
      }
      y[j] = static_cast<T>(relu_scalar(z));
    }
    if constexpr (kMask) {
      set_mask_bits(mask, y, j0, j1);
    }
  };
  auto store = [&](T* p, const AV (&v)[P]) {
    if constexpr (kNT) {
      V::store_nt(p, v);
    } else {
      V::store(p, v);
    }
  };
  const AV zero(A(0));
  // the mask of out as stored (in T), like bn_act_bwd reads it from out
  auto record = [&](int64_t j0, const AV (&v)[P]) {
    if constexpr (kMask) {
      AV stored[P];
      V::round(v, stored);
      FR_UNROLL
      for (int64_t q = 0; q < P; ++q) {
        mask[(j0 + q * H) / 8] = lane_bits(relu_off_vec(stored[q], zero));
      }
    }
  };
  int64_t j = 0;
  if constexpr (kNT) {
    const int64_t head = stream_head(y);
    // (a head would shift the vectors off the mask bytes: plain stores then)
    if (head < 0 || (kMask && head != 0)) {
      fwd_apply_span<T, kRes, kPerPos, false, kMask>(y, x, r, L, scale, shift, mask);
      return;
    }
    j = std::min(head, L);
    scalar(0, j);
  }
  const AV sc0(scale[0]);
  const AV sh0(shift[0]);
  for (; j + 2 * K <= L; j += 2 * K) {
    AV a[P], b[P], ra[P], rb[P];
    V::load(x + j, a);
    V::load(x + j + K, b);
    if constexpr (kRes) {
      V::load(r + j, ra);
      V::load(r + j + K, rb);
    }
    FR_UNROLL
    for (int64_t q = 0; q < P; ++q) {
      AV za, zb;
      if constexpr (kPerPos) {
        za = at::vec::fmadd(a[q], AV::loadu(scale + j + q * H), AV::loadu(shift + j + q * H));
        zb = at::vec::fmadd(
            b[q], AV::loadu(scale + j + K + q * H), AV::loadu(shift + j + K + q * H));
      } else {
        za = at::vec::fmadd(a[q], sc0, sh0);
        zb = at::vec::fmadd(b[q], sc0, sh0);
      }
      if constexpr (kRes) {
        za = za + ra[q];
        zb = zb + rb[q];
      }
      a[q] = relu_vec(za, zero);
      b[q] = relu_vec(zb, zero);
    }
    store(y + j, a);
    store(y + j + K, b);
    record(j, a);
    record(j + K, b);
  }
  for (; j + K <= L; j += K) {
    AV a[P], ra[P];
    V::load(x + j, a);
    if constexpr (kRes) {
      V::load(r + j, ra);
    }
    FR_UNROLL
    for (int64_t q = 0; q < P; ++q) {
      AV za;
      if constexpr (kPerPos) {
        za = at::vec::fmadd(a[q], AV::loadu(scale + j + q * H), AV::loadu(shift + j + q * H));
      } else {
        za = at::vec::fmadd(a[q], sc0, sh0);
      }
      if constexpr (kRes) {
        za = za + ra[q];
      }
      a[q] = relu_vec(za, zero);
    }
    store(y + j, a);
    record(j, a);
  }
  scalar(j, L);
}

// Rows layout: apply to `nrows` consecutive super-rows of width W (per-position params of W).
// With a mask (kMask), W is a multiple of 8 and mask points at the bits of y[0].
template <typename T, bool kRes, bool kNT, bool kMask = false>
void fwd_apply_rows(
    T* y, const T* x, const T* r, int64_t nrows, int64_t W, const acc_type<T>* scale,
    const acc_type<T>* shift, MaskWord* mask = nullptr) {
  for (int64_t i = 0; i < nrows; ++i) {
    const int64_t o = i * W;
    fwd_apply_span<T, kRes, true, kNT, kMask>(
        y + o, x + o, kRes ? r + o : nullptr, W, scale, shift, kMask ? mask + o / 8 : nullptr);
  }
}

// ------------------------------------------------------------------------------------------
// Rows layout statistics. A block of nr rows (width W) is reduced per position, a register
// tile of NS vector steps at a time: sums → block means, then centred squares over the same
// (L1-resident) tile. Blocks merge into the chunk's per-position moments with Chan's formula
// (counts are uniform over positions, so the coefficients are scalars).

template <typename T, int64_t NS>
C10_ALWAYS_INLINE void rows_moments_tile(
    const T* __restrict__ x, int64_t W, int64_t r0, int64_t nr, int64_t j,
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
    const T* row = x + (r0 + i) * W + j;
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
    const T* row = x + (r0 + i) * W + j;
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

template <typename T>
void rows_chunk_moments(
    const T* x, int64_t W, int64_t g0, int64_t g1, acc_type<T>* mean, acc_type<T>* m2,
    acc_type<T>* bmean, acc_type<T>* bm2) {
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
      rows_moments_tile<T, NS>(x, W, gb, nb, j, bmean, bm2);
    }
    for (; j < Wv; j += K) {
      rows_moments_tile<T, 1>(x, W, gb, nb, j, bmean, bm2);
    }
    for (; j < W; ++j) {  // positions past the last full vector (k == 1, C % K != 0)
      A sum = A(0);
      for (int64_t i = 0; i < nb; ++i) {
        sum += static_cast<A>(x[(gb + i) * W + j]);
      }
      const A bm = sum / A(nb);
      A q = A(0);
      for (int64_t i = 0; i < nb; ++i) {
        const A d = static_cast<A>(x[(gb + i) * W + j]) - bm;
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

// ------------------------------------------------------------------------------------------
// Training forward.

template <typename T>
struct TrainArgs {
  const T* x;
  const T* r;  // nullptr without residual
  T* y;
  int64_t N, C, S;
  const acc_type<T>* w;
  const acc_type<T>* b;
  double eps;
  acc_type<T>* mean_out;
  acc_type<T>* invstd_out;
  acc_type<T>* var_out;
  MaskWord* relu_mask;  // rows layout: the ReLU mask bits (written when rows_keep_mask)
  RunningStatsUpdate<acc_type<T>> running;  // applied per channel by finalize_channel
};

// From the merged moments of channel c: writes the statistics, updates the running ones, and
// returns (scale, shift).
template <typename T>
C10_ALWAYS_INLINE std::pair<acc_type<T>, acc_type<T>> finalize_channel(
    const TrainArgs<T>& a, const Moments<acc_type<T>>& m, int64_t c) {
  using A = acc_type<T>;
  const auto [mean, var] = biased_mean_var(m);
  // invstd in double, rounded once (as aten's batch_norm does)
  const double invstd = 1.0 / std::sqrt(static_cast<double>(var) + a.eps);
  const double scale = static_cast<double>(a.w[c]) * invstd;
  const double shift = static_cast<double>(a.b[c]) - static_cast<double>(mean) * scale;
  a.mean_out[c] = mean;
  a.var_out[c] = var;
  a.invstd_out[c] = static_cast<A>(invstd);
  a.running.template apply<T>(c, mean, var);
  return {static_cast<A>(scale), static_cast<A>(shift)};
}

template <typename T, bool kRes, bool kNT>
void train_planes(const TrainArgs<T>& a) {
  using A = acc_type<T>;
  const PlaneTasks tasks(a.N, a.C, a.S, at::get_num_threads());

  if (tasks.P == 1) {
    // channel-local: statistics + apply in one task, the channel stays in L2 in between
    at::parallel_for(0, tasks.count(), tasks.grain(), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Moments<A> m = task_moments(a.x, tasks, c);
        const auto [scale, shift] =
            finalize_channel(a, m, c);
        tasks.for_each_span(c, [&](int64_t o, int64_t len) {
          fwd_apply_span<T, kRes, false, kNT>(
              a.y + o, a.x + o, kRes ? a.r + o : nullptr, len, &scale, &shift);
        });
      }
      if (kNT) {
        stream_fence();
      }
    });
    return;
  }

  // split: partial moments of every part, an ordered merge, then the apply pass over the same
  // parts (same static partition)
  std::vector<Moments<A>> moments(a.C);
  planes_moments(a.x, tasks, moments.data());
  std::vector<A> scale(a.C), shift(a.C);
  for (int64_t c = 0; c < a.C; ++c) {
    std::tie(scale[c], shift[c]) =
        finalize_channel(a, moments[c], c);
  }
  at::parallel_for(0, tasks.count(), tasks.grain(), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = tasks.channel(t);
      tasks.for_each_span(t, [&](int64_t o, int64_t len) {
        fwd_apply_span<T, kRes, false, kNT>(
            a.y + o, a.x + o, kRes ? a.r + o : nullptr, len, &scale[c], &shift[c]);
      });
    }
    if (kNT) {
      stream_fence();
    }
  });
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
      rows_chunk_moments(x, W, g0, g1, mean, m2, m2 + W, m2 + 2 * W);
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

// Rows layout: apply to chunk p's super-rows (and, for the last chunk, the leftover rows) with
// per-position scale/shift of width W. kMask: with the mask bits of all of them (W % 8 == 0, so
// the chunk and the leftover rows start on a mask byte).
template <typename T, bool kRes, bool kNT, bool kMask>
void fwd_apply_chunk(
    const RowPlan& plan, int64_t p, T* y, const T* x, const T* r, const acc_type<T>* scale,
    const acc_type<T>* shift, MaskWord* mask) {
  const int64_t g0 = plan.chunk_begin(p), g1 = plan.chunk_end(p);
  const int64_t o = g0 * plan.W;
  fwd_apply_rows<T, kRes, kNT, kMask>(
      y + o, x + o, kRes ? r + o : nullptr, g1 - g0, plan.W, scale, shift,
      kMask ? mask + o / 8 : nullptr);
  if (p == plan.P - 1 && plan.Rl > 0) {
    const int64_t ol = plan.G * plan.W;
    fwd_apply_span<T, kRes, true, kNT, kMask>(
        y + ol, x + ol, kRes ? r + ol : nullptr, plan.Rl * plan.C, scale, shift,
        kMask ? mask + ol / 8 : nullptr);
  }
}

template <typename T, bool kRes, bool kNT>
void train_rows(const TrainArgs<T>& a) {
  using A = acc_type<T>;
  const int64_t C = a.C;
  const RowPlan plan(C, a.N * a.S, VecT<T>::kStep, at::get_num_threads());

  std::vector<Moments<A>> moments(C);
  rows_moments(a.x, plan, moments.data());
  std::vector<A> scale(C), shift(C);
  for (int64_t c = 0; c < C; ++c) {
    std::tie(scale[c], shift[c]) =
        finalize_channel(a, moments[c], c);
  }
  repeat_channels(scale, C, plan.W);
  repeat_channels(shift, C, plan.W);

  // apply: chunk p by the thread that reduced it (same static partition)
  auto apply = [&](auto keep_mask) {
    constexpr bool kMask = decltype(keep_mask)::value;
    at::parallel_for(0, plan.P, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        fwd_apply_chunk<T, kRes, kNT, kMask>(
            plan, p, a.y, a.x, a.r, scale.data(), shift.data(), a.relu_mask);
      }
      if (kNT) {
        stream_fence();
      }
    });
  };
  if constexpr (kMaskableType<T>) {
    if (rows_keep_mask<T>(plan)) {
      apply(std::true_type{});
      return;
    }
  }
  apply(std::false_type{});
  // no mask kept: defined contents, which bn_act_bwd does not read
  std::fill(a.relu_mask, a.relu_mask + relu_mask_bytes(a.N * a.S * C), MaskWord(0));
}

// ------------------------------------------------------------------------------------------
// Eval forward: one pass.

template <typename T, bool kRes, bool kNT>
void eval_kernel(
    const Geometry& g, const T* x, const T* r, T* y, const acc_type<T>* scale,
    const acc_type<T>* shift) {
  using A = acc_type<T>;
  const int64_t N = g.N, C = g.C, S = g.S;
  if (!g.rows) {
    // flat range over all elements, cut at plane boundaries
    const int64_t total = N * C * S;
    at::parallel_for(0, total, kParallelMinElems, [&](int64_t e0, int64_t e1) {
      int64_t e = e0;
      while (e < e1) {
        const int64_t plane = e / S;
        const int64_t s = e - plane * S;
        const int64_t len = std::min(S - s, e1 - e);
        const int64_t c = plane % C;
        fwd_apply_span<T, kRes, false, kNT>(
            y + e, x + e, kRes ? r + e : nullptr, len, scale + c, shift + c);
        e += len;
      }
      if (kNT) {
        stream_fence();
      }
    });
    return;
  }
  const RowPlan plan(C, N * S, VecT<T>::kStep, at::get_num_threads());
  const int64_t W = plan.W, G = plan.G;
  std::vector<A> sc(scale, scale + C), sh(shift, shift + C);
  repeat_channels(sc, C, W);
  repeat_channels(sh, C, W);
  const int64_t units = G + (plan.Rl > 0 ? 1 : 0);
  const int64_t grain = std::max<int64_t>(1, kParallelMinElems / W);
  at::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) {
    const int64_t full_end = std::min(u1, G);
    if (full_end > u0) {
      const int64_t o = u0 * W;
      fwd_apply_rows<T, kRes, kNT>(
          y + o, x + o, kRes ? r + o : nullptr, full_end - u0, W, sc.data(), sh.data());
    }
    if (u1 > G) {
      const int64_t ol = G * W;
      fwd_apply_span<T, kRes, true, kNT>(
          y + ol, x + ol, kRes ? r + ol : nullptr, plan.Rl * C, sc.data(), sh.data());
    }
    if (kNT) {
      stream_fence();
    }
  });
}

// Per-channel moments of a non-empty input in its native layout.
template <typename T>
void channel_moments(const Geometry& g, const T* x, Moments<acc_type<T>>* out) {
  const int64_t threads = at::get_num_threads();
  if (g.rows) {
    rows_moments(x, RowPlan(g.C, g.M(), VecT<T>::kStep, threads), out);
  } else {
    planes_moments(x, PlaneTasks(g.N, g.C, g.S, threads), out);
  }
}

} // namespace

namespace {

TrainOutputs fwd_train_cpu(
    const FwdOperands& in, const OptTensor& weight, const OptTensor& bias, double eps,
    const RunningBuffers* running) {
  constexpr const char* op = "bn_act_fwd_train";
  const Geometry& g = in.g;
  const bool has_res = in.residual.defined();
  const auto stat_opts = g.x.options().dtype(acc_dtype(g.x.scalar_type()));
  at::Tensor out = empty_activation(g);
  at::Tensor mean = at::empty({g.C}, stat_opts);
  at::Tensor invstd = at::empty({g.C}, stat_opts);
  at::Tensor var = at::empty({g.C}, stat_opts);
  // the rows layout's ReLU mask (bn_act_cpu.h), for bn_act_bwd; zeros where the kernel keeps
  // none (train_rows)
  at::Tensor relu_mask = at::empty({cpu_relu_mask_bytes(g)}, g.x.options().dtype(at::kByte));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_type<scalar_t>;
    std::vector<A> w(g.C), b(g.C);
    read_param<A>(weight, g.C, A(1), w.data());
    read_param<A>(bias, g.C, A(0), b.data());
    TrainArgs<scalar_t> a;
    a.x = g.x.const_data_ptr<scalar_t>();
    a.r = has_res ? in.residual.const_data_ptr<scalar_t>() : nullptr;
    a.y = out.mutable_data_ptr<scalar_t>();
    a.N = g.N;
    a.C = g.C;
    a.S = g.S;
    a.w = w.data();
    a.b = b.data();
    a.eps = eps;
    a.mean_out = mean.mutable_data_ptr<A>();
    a.invstd_out = invstd.mutable_data_ptr<A>();
    a.var_out = var.mutable_data_ptr<A>();
    a.relu_mask = relu_mask.mutable_data_ptr<MaskWord>();
    a.running = running_stats_update<A>(running, g.M());
    if (g.M() == 0) {
      // empty batch: mean 0, var 0, invstd 1/sqrt(eps); out is empty; nothing is updated
      for (int64_t c = 0; c < g.C; ++c) {
        finalize_channel(a, Moments<A>{}, c);
      }
      return;
    }
    if (g.C == 0) {
      return;
    }
    // bytes of activations touched: x (read twice unless it stays in cache), r, y
    const int64_t bytes = g.numel() * int64_t(sizeof(scalar_t)) * (has_res ? 3 : 2);
    const bool nt = use_streaming_stores(bytes, Pass::kTwo);
    auto run = [&](auto res_c, auto nt_c) {
      constexpr bool kRes = decltype(res_c)::value;
      constexpr bool kNT = decltype(nt_c)::value;
      if (g.rows) {
        train_rows<scalar_t, kRes, kNT>(a);
      } else {
        train_planes<scalar_t, kRes, kNT>(a);
      }
    };
    dispatch_bools(has_res, nt, run);
  });
  return {out, mean, invstd, var, relu_mask};
}

at::Tensor fwd_eval_cpu(
    const FwdOperands& in, const at::Tensor& running_mean, const at::Tensor& running_var,
    const OptTensor& weight, const OptTensor& bias, double eps) {
  constexpr const char* op = "bn_act_fwd_eval";
  const Geometry& g = in.g;
  const bool has_res = in.residual.defined();
  at::Tensor out = empty_activation(g);
  if (g.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.x.scalar_type(), op, [&] {
    using A = acc_type<scalar_t>;
    const int64_t C = g.C;
    std::vector<A> w(C), b(C), rm(C), rv(C), scale(C), shift(C);
    read_param<A>(weight, C, A(1), w.data());
    read_param<A>(bias, C, A(0), b.data());
    read_param<A>(running_mean, C, A(0), rm.data());
    read_param<A>(running_var, C, A(1), rv.data());
    for (int64_t c = 0; c < C; ++c) {
      const double invstd = 1.0 / std::sqrt(static_cast<double>(rv[c]) + eps);
      const double s = static_cast<double>(w[c]) * invstd;
      scale[c] = static_cast<A>(s);
      shift[c] = static_cast<A>(static_cast<double>(b[c]) - static_cast<double>(rm[c]) * s);
    }
    const scalar_t* x = g.x.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    const scalar_t* rp = has_res ? in.residual.const_data_ptr<scalar_t>() : nullptr;
    const int64_t bytes = g.numel() * int64_t(sizeof(scalar_t)) * (has_res ? 3 : 2);
    const bool nt = use_streaming_stores(bytes, Pass::kOne);
    dispatch_bools(has_res, nt, [&](auto res_c, auto nt_c) {
      eval_kernel<scalar_t, decltype(res_c)::value, decltype(nt_c)::value>(
          g, x, rp, y, scale.data(), shift.data());
    });
  });
  return out;
}

} // namespace

const BnActDevice kCpuForwards{fwd_train_cpu, fwd_eval_cpu};

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& input) {
  constexpr const char* op = "bn_stats";
  const Geometry g = stats_operands(input);
  const auto stat_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor mean = at::empty({g.C}, stat_opts);
  at::Tensor var = at::empty({g.C}, stat_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), op, [&] {
    using A = acc_type<scalar_t>;
    std::vector<Moments<A>> moments(g.C);  // empty moments: mean 0, var 0
    if (g.numel() > 0) {
      channel_moments(g, g.x.const_data_ptr<scalar_t>(), moments.data());
    }
    A* mean_out = mean.mutable_data_ptr<A>();
    A* var_out = var.mutable_data_ptr<A>();
    for (int64_t c = 0; c < g.C; ++c) {
      std::tie(mean_out[c], var_out[c]) = biased_mean_var(moments[c]);
    }
  });
  return {mean, var};
}

} // namespace fused_resnet::cpu
