// Backward CPU kernels: bn_act_bwd (of both forwards), and its two passes as separate ops for
// SyncBatchNorm, bn_act_bwd_reduce (the sums) and bn_act_bwd_apply (dx, dr from given global
// means of the sums), built from the same reduce and apply code.
//
//   dz = (out <= 0) ? 0 : grad_out                  (aten threshold_backward; NaN out passes)
//   grad_bias = Σdz,  grad_weight = Σdz·x̂ = invstd·Σdz·(x − mean)
//   grad_input = A·dz + B·(x − mean) + D,  A = w·invstd,
//       B = −A·invstd·grad_weight/M, D = −A·grad_bias/M     when batch_stats
//       B = D = 0 (x is not even read)                       otherwise
//   grad_residual = dz                                       when residual_grad
//   bn_act_bwd_apply: B = −A·invstd·mean_dz_xhat, D = −A·mean_dz  (means over all processes)
//
// One reduce pass (reads dy, y, x) and one apply pass (reads dy, y, x; writes dx, dr). Sums
// are two-level: fp32 (double for double) vector accumulators over a block, then added to a
// double total in a fixed order (deterministic for a given thread count). Layouts and parallel
// decomposition mirror the forward (bn_act_fwd.cpp): in the planes layout a channel-local task
// keeps the channel's three inputs in L2 between its two passes; in the rows layout each thread
// reduces and then applies its own contiguous chunk of rows, and bn_act_bwd takes the ReLU mask
// as bits instead of reading y: those bn_act_fwd_train saved (relu_mask; then y is not read at
// all), or else bits its reduce pass records for its apply pass (RowMask).
#include "bn_act_cpu.h"

#include <ATen/ops/empty.h>

namespace fused_resnet::cpu {

namespace {

template <bool kBatch_, bool kResGrad_, bool kNT_>
struct BwdFlags {
  static constexpr bool kBatch = kBatch_;      // batch statistics: dx has the mean terms
  static constexpr bool kResGrad = kResGrad_;  // write grad_residual
  static constexpr bool kNT = kNT_;            // streaming stores for dx/dr
};

// Per-channel totals of the reduce pass, in double whatever the dtype. Σdz·(x − mean) over a
// channel's N·S elements can cancel to far less than its partial sums (eval mode, where mean is
// the running mean, or a gradient that sums to ~0): fp32 block sums (a kBlockBytes span, or
// kRowBlock rows, at most 4 blocks of them in the rows layout) are exact enough, but thousands
// of them added into an fp32 total lose the result. Adding them in double costs one add per
// block.
struct Sums {
  double dz = 0;
  double dzx = 0;  // Σdz·(x − mean)
};

// ------------------------------------------------------------------------------------------
// Planes layout: Σdz and Σdz·(x − mean) over one contiguous span (constant mean).

template <typename T>
C10_ALWAYS_INLINE void reduce_span_block(
    const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x, int64_t L,
    acc_type<T> mean, Sums& out) {
  using V = VecT<T>;
  using A = typename V::acc_t;
  using AV = typename V::AV;
  constexpr int64_t K = V::kStep;
  constexpr int64_t P = V::kParts;
  constexpr int64_t U = 4 / P;  // 4 independent chains per sum (8 in all)
  constexpr int64_t NA = U * P;
  const AV zero(A(0));
  const AV mv(mean);
  AV sd[NA], sx[NA];
  FR_UNROLL
  for (int64_t i = 0; i < NA; ++i) {
    sd[i] = zero;
    sx[i] = zero;
  }
  int64_t j = 0;
  for (; j + U * K <= L; j += U * K) {
    FR_UNROLL
    for (int64_t u = 0; u < U; ++u) {
      AV g[P], o[P], xv[P];
      V::load(dy + j + u * K, g);
      V::load(y + j + u * K, o);
      V::load(x + j + u * K, xv);
      FR_UNROLL
      for (int64_t q = 0; q < P; ++q) {
        const AV dz = relu_grad_vec(g[q], o[q], zero);
        sd[u * P + q] = sd[u * P + q] + dz;
        sx[u * P + q] = at::vec::fmadd(dz, xv[q] - mv, sx[u * P + q]);
      }
    }
  }
  for (; j + K <= L; j += K) {
    AV g[P], o[P], xv[P];
    V::load(dy + j, g);
    V::load(y + j, o);
    V::load(x + j, xv);
    FR_UNROLL
    for (int64_t q = 0; q < P; ++q) {
      const AV dz = relu_grad_vec(g[q], o[q], zero);
      sd[q] = sd[q] + dz;
      sx[q] = at::vec::fmadd(dz, xv[q] - mv, sx[q]);
    }
  }
  A bd = hsum(sum_accumulators(sd));
  A bx = hsum(sum_accumulators(sx));
  for (; j < L; ++j) {
    const A dz = relu_grad_scalar(static_cast<A>(dy[j]), static_cast<A>(y[j]));
    bd += dz;
    bx += dz * (static_cast<A>(x[j]) - mean);
  }
  out.dz += bd;
  out.dzx += bx;
}

template <typename T>
C10_ALWAYS_INLINE void reduce_span(
    const T* dy, const T* y, const T* x, int64_t L, acc_type<T> mean, Sums& out) {
  constexpr int64_t kBlock = kBlockBytes / sizeof(T);
  for (int64_t lo = 0; lo < L; lo += kBlock) {
    const int64_t len = std::min(kBlock, L - lo);
    reduce_span_block(dy + lo, y + lo, x + lo, len, mean, out);
  }
}

// ------------------------------------------------------------------------------------------
// Apply over one contiguous span: dx = A·dz + B·(x − mean) + D; dr = dz. kPerPos: coefficient
// arrays indexed like the span (rows layout), otherwise coefficient[0] constants.

// kMask: whole vectors take the ReLU mask from the bits `mask` (bn_act_cpu.h; byte 0 starts at
// the span's element 0) instead of reading y; the scalar head and tail still read y.
template <typename T, typename F, bool kPerPos, bool kMask = false>
C10_ALWAYS_INLINE void apply_span(
    T* __restrict__ dx, T* __restrict__ dr, const T* __restrict__ dy, const T* __restrict__ y,
    const T* __restrict__ x, int64_t L, const acc_type<T>* __restrict__ cA,
    const acc_type<T>* __restrict__ cB, const acc_type<T>* __restrict__ cmean,
    const acc_type<T>* __restrict__ cD, const MaskWord* __restrict__ mask = nullptr) {
  using V = VecT<T>;
  using A = typename V::acc_t;
  using AV = typename V::AV;
  constexpr int64_t K = V::kStep;
  constexpr int64_t P = V::kParts;
  constexpr int64_t H = AV::size();
  auto scalar = [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const A dz = relu_grad_scalar(static_cast<A>(dy[j]), static_cast<A>(y[j]));
      const A a = kPerPos ? cA[j] : cA[0];
      A v;
      if constexpr (F::kBatch) {
        const A b = kPerPos ? cB[j] : cB[0];
        const A m = kPerPos ? cmean[j] : cmean[0];
        const A d = kPerPos ? cD[j] : cD[0];
        v = std::fma(a, dz, std::fma(b, static_cast<A>(x[j]) - m, d));
      } else {
        v = a * dz;
      }
      dx[j] = static_cast<T>(v);
      if constexpr (F::kResGrad) {
        dr[j] = static_cast<T>(dz);
      }
    }
  };
  int64_t j = 0;
  if constexpr (F::kNT) {
    const int64_t head = stream_head(dx);
    if (head < 0 || (F::kResGrad && stream_head(dr) != head)) {
      using Plain = BwdFlags<F::kBatch, F::kResGrad, false>;
      apply_span<T, Plain, kPerPos, kMask>(dx, dr, dy, y, x, L, cA, cB, cmean, cD, mask);
      return;
    }
    if (kMask && head != 0) {  // vectors would straddle mask words: take the mask from y
      apply_span<T, F, kPerPos, false>(dx, dr, dy, y, x, L, cA, cB, cmean, cD);
      return;
    }
    j = std::min(head, L);
    scalar(0, j);
  }
  const AV zero(A(0));
  const AV a0(cA[0]);
  AV b0(A(0)), m0(A(0)), d0(A(0));
  if constexpr (F::kBatch) {
    b0 = AV(cB[0]);
    m0 = AV(cmean[0]);
    d0 = AV(cD[0]);
  }
  for (; j + K <= L; j += K) {
    AV g[P], o[P], xv[P], res[P], dzs[P];
    V::load(dy + j, g);
    if constexpr (!kMask) {
      V::load(y + j, o);
    }
    if constexpr (F::kBatch) {
      V::load(x + j, xv);
    }
    FR_UNROLL
    for (int64_t q = 0; q < P; ++q) {
      AV dz;
      if constexpr (kMask) {
        dz = AV::blendv(g[q], zero, lanes_from_bits(mask[(j + q * H) / 8]));
      } else {
        dz = relu_grad_vec(g[q], o[q], zero);
      }
      dzs[q] = dz;
      const int64_t i = j + q * H;
      if constexpr (F::kBatch) {
        if constexpr (kPerPos) {
          const AV t = at::vec::fmadd(
              AV::loadu(cB + i), xv[q] - AV::loadu(cmean + i), AV::loadu(cD + i));
          res[q] = at::vec::fmadd(AV::loadu(cA + i), dz, t);
        } else {
          res[q] = at::vec::fmadd(a0, dz, at::vec::fmadd(b0, xv[q] - m0, d0));
        }
      } else {
        res[q] = kPerPos ? AV::loadu(cA + i) * dz : a0 * dz;
      }
    }
    if constexpr (F::kNT) {
      V::store_nt(dx + j, res);
      if constexpr (F::kResGrad) {
        V::store_nt(dr + j, dzs);
      }
    } else {
      V::store(dx + j, res);
      if constexpr (F::kResGrad) {
        V::store(dr + j, dzs);
      }
    }
  }
  scalar(j, L);
}

template <typename T>
struct BwdArgs {
  const T* dy;
  const T* y;
  const T* x;
  T* dx;  // nullptr in bn_act_bwd_reduce
  T* dr;  // nullptr unless residual_grad
  int64_t N, C, S;
  const acc_type<T>* w;
  const acc_type<T>* mean;
  const acc_type<T>* invstd;
  const MaskWord* relu_mask;  // bn_act_bwd: the bits bn_act_fwd_train saved, or null
};

template <typename A>
struct Coef {
  A a, b, d;
};

// grad_input = a·dz + b·(x − mean) + d with a = w·invstd and, for batch statistics,
//   b = −a·invstd·Σdz·x̂·inv_count,  d = −a·Σdz·inv_count
// (inv_count = 1/M with this input's sums; 1 with given global means of the sums).
template <typename A>
C10_ALWAYS_INLINE Coef<A> batch_coef(A w, A invstd, A sum_dz_xhat, A sum_dz, A inv_count) {
  Coef<A> k;
  k.a = w * invstd;
  k.b = -k.a * invstd * sum_dz_xhat * inv_count;
  k.d = -k.a * sum_dz * inv_count;
  return k;
}

// Running statistics: the mean terms vanish.
template <typename A>
C10_ALWAYS_INLINE Coef<A> running_coef(A w, A invstd) {
  return Coef<A>{w * invstd, A(0), A(0)};
}

// Σdz·x̂ = invstd·Σdz·(x − mean): grad_weight of this input.
template <typename A>
C10_ALWAYS_INLINE A sum_dz_xhat(const Sums& s, A invstd) {
  return static_cast<A>(s.dzx * static_cast<double>(invstd));
}

// ------------------------------------------------------------------------------------------
// Planes layout (tasks: PlaneTasks in bn_act_cpu.h).

template <typename T>
Sums task_sums(const BwdArgs<T>& a, const PlaneTasks& tasks, int64_t t) {
  Sums s;
  const acc_type<T> mean = a.mean[tasks.channel(t)];
  tasks.for_each_span(t, [&](int64_t o, int64_t len) {
    reduce_span(a.dy + o, a.y + o, a.x + o, len, mean, s);
  });
  return s;
}

template <typename T, typename F>
C10_ALWAYS_INLINE void apply_task(
    const BwdArgs<T>& a, const PlaneTasks& tasks, int64_t t, const Coef<acc_type<T>>& k) {
  const int64_t c = tasks.channel(t);
  tasks.for_each_span(t, [&](int64_t o, int64_t len) {
    apply_span<T, F, false>(
        a.dx + o, F::kResGrad ? a.dr + o : nullptr, a.dy + o, a.y + o, a.x + o, len, &k.a, &k.b,
        a.mean + c, &k.d);
  });
}

// Per-channel sums: the tasks in parallel, then each channel's parts added in order.
template <typename T>
void planes_sums(const BwdArgs<T>& a, const PlaneTasks& tasks, Sums* out) {
  std::vector<Sums> part(tasks.count());
  at::parallel_for(0, tasks.count(), tasks.grain(), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      part[t] = task_sums(a, tasks, t);
    }
  });
  for (int64_t c = 0; c < tasks.C; ++c) {
    Sums s;
    for (int64_t p = 0; p < tasks.P; ++p) {
      s.dz += part[c * tasks.P + p].dz;
      s.dzx += part[c * tasks.P + p].dzx;
    }
    out[c] = s;
  }
}

template <typename T, typename F>
void planes_apply(const BwdArgs<T>& a, const PlaneTasks& tasks, const Coef<acc_type<T>>* coef) {
  at::parallel_for(0, tasks.count(), tasks.grain(), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      apply_task<T, F>(a, tasks, t, coef[tasks.channel(t)]);
    }
    if (F::kNT) {
      stream_fence();
    }
  });
}

// ------------------------------------------------------------------------------------------
// Rows layout.

// Where the rows reduce pass takes the ReLU mask from: out (kOut), out while recording its bits
// for the apply pass (kOutRecord), or the bits bn_act_fwd_train saved (kSavedBits).
enum class MaskSource { kOut, kOutRecord, kSavedBits };

// Per-position Σdz and Σdz·(x − mean) of a tile of NS vector steps (positions [j, j + NS*K))
// over rows [r0, r0 + nr) of width W; added to sdz/sdzx (the block total goes in in one add).
// The mask bits of the vector at element e are byte e / 8 of saved (kSavedBits) or of record
// (kOutRecord, written here).
template <typename T, int64_t NS, MaskSource kSrc>
C10_ALWAYS_INLINE void rows_reduce_tile(
    const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x, int64_t W,
    int64_t r0, int64_t nr, int64_t j, const acc_type<T>* __restrict__ mean,
    acc_type<T>* __restrict__ sdz, acc_type<T>* __restrict__ sdzx,
    const MaskWord* __restrict__ saved, MaskWord* __restrict__ record) {
  using V = VecT<T>;
  using A = typename V::acc_t;
  using AV = typename V::AV;
  constexpr int64_t K = V::kStep;
  constexpr int64_t P = V::kParts;
  constexpr int64_t H = AV::size();
  constexpr int64_t NA = NS * P;
  const AV zero(A(0));
  AV sd[NA], sx[NA];
  FR_UNROLL
  for (int64_t i = 0; i < NA; ++i) {
    sd[i] = zero;
    sx[i] = zero;
  }
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t o = (r0 + i) * W + j;
    FR_UNROLL
    for (int64_t u = 0; u < NS; ++u) {
      AV g[P], ov[P], xv[P];
      V::load(dy + o + u * K, g);
      if constexpr (kSrc != MaskSource::kSavedBits) {
        V::load(y + o + u * K, ov);
      }
      V::load(x + o + u * K, xv);
      FR_UNROLL
      for (int64_t q = 0; q < P; ++q) {
        const int64_t e = o + u * K + q * H;
        AV off;
        if constexpr (kSrc == MaskSource::kSavedBits) {
          off = lanes_from_bits(saved[e / 8]);
        } else {
          off = relu_off_vec(ov[q], zero);
        }
        const AV dz = AV::blendv(g[q], zero, off);
        if constexpr (kSrc == MaskSource::kOutRecord) {
          record[e / 8] = lane_bits(off);
        }
        const AV m = AV::loadu(mean + j + u * K + q * H);
        sd[u * P + q] = sd[u * P + q] + dz;
        sx[u * P + q] = at::vec::fmadd(dz, xv[q] - m, sx[u * P + q]);
      }
    }
  }
  FR_UNROLL
  for (int64_t i = 0; i < NA; ++i) {
    const int64_t t = j + i * H;
    (AV::loadu(sdz + t) + sd[i]).store(sdz + t);
    (AV::loadu(sdzx + t) + sx[i]).store(sdzx + t);
  }
}

// The ReLU mask of the rows path, as bits (bn_act_cpu.h), for the super-rows when
// rows_keep_mask (leftover rows, other widths and other builds read out). The apply pass needs
// dz = (out <= 0) ? 0 : dy for every element after the reduce pass has streamed dy, out and x
// through the caches; with the bits it reads dy, x and the bits (2 + 1/32 operands) instead of
// dy, out and x (3).
//   saved:  relu_mask from bn_act_fwd_train; the reduce pass reads it too, so out is not read
//           at all (the training backward).
//   record: otherwise (bn_act_bwd after the eval forward), the reduce pass records the bits
//           from out for the apply pass, into a buffer of the calling thread that only grows:
//           a fresh 200 KB allocation per call ((8,64,56,56) fp32) was above glibc's mmap
//           threshold, so it was mapped, page-faulted and unmapped on every call (50-96 page
//           faults per training step, counted with getrusage).
// Measured on the 2-core EPYC VM, (8,64,56,56) channels_last fp32, in-process A/B: recording
// made the op 5-10% faster than reading out twice (session 3); reading saved bits instead of
// out in the reduce pass as well: 0.58 vs 0.75 ms for the op, cold inputs, median of 30
// interleaved rounds (session 4).
struct RowMask {
  const MaskWord* saved = nullptr;
  MaskWord* record = nullptr;
  // reads the bits of the apply pass
  const MaskWord* bits() const { return saved != nullptr ? saved : record; }
};

template <typename T>
RowMask row_mask(const RowPlan& plan, const MaskWord* saved) {
  RowMask m;
  if (!rows_keep_mask<T>(plan)) {
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

// Per-position sums over super-rows [g0, g1) of width W, in blocks of kRowBlock rows, the
// ReLU mask taken as `mask` says (RowMask; W is then a multiple of the vector step). Block
// totals go into acc_t sums (psdz, psdzx: W each), which are added into the double sums every
// kFlushBlocks blocks (see Sums).
template <typename T>
void rows_chunk_sums(
    const T* dy, const T* y, const T* x, int64_t W, int64_t g0, int64_t g1,
    const acc_type<T>* mean, double* sdz, double* sdzx, acc_type<T>* psdz, acc_type<T>* psdzx,
    const RowMask& mask) {
  using V = VecT<T>;
  using A = typename V::acc_t;
  constexpr int64_t K = V::kStep;
  constexpr int64_t NS = kTileVectors / V::kParts;
  constexpr int64_t kFlushBlocks = 4;
  const int64_t Wv = W / K * K;
  std::fill(sdz, sdz + W, 0.0);
  std::fill(sdzx, sdzx + W, 0.0);
  std::fill(psdz, psdz + W, A(0));
  std::fill(psdzx, psdzx + W, A(0));
  auto flush = [&] {
    for (int64_t t = 0; t < W; ++t) {
      sdz[t] += static_cast<double>(psdz[t]);
      sdzx[t] += static_cast<double>(psdzx[t]);
      psdz[t] = A(0);
      psdzx[t] = A(0);
    }
  };
  int64_t blocks = 0;
  for (int64_t gb = g0; gb < g1; gb += kRowBlock) {
    const int64_t nb = std::min(kRowBlock, g1 - gb);
    if (blocks++ == kFlushBlocks) {
      flush();
      blocks = 1;
    }
    int64_t j = 0;
    auto tiles = [&](auto source) {
      constexpr MaskSource kSrc = decltype(source)::value;
      for (; j + NS * K <= Wv; j += NS * K) {
        rows_reduce_tile<T, NS, kSrc>(
            dy, y, x, W, gb, nb, j, mean, psdz, psdzx, mask.saved, mask.record);
      }
      for (; j < Wv; j += K) {
        rows_reduce_tile<T, 1, kSrc>(
            dy, y, x, W, gb, nb, j, mean, psdz, psdzx, mask.saved, mask.record);
      }
    };
    using Src = MaskSource;
    if constexpr (kMaskableType<T>) {  // (row_mask keeps no mask for other types)
      if (mask.saved != nullptr) {
        tiles(std::integral_constant<Src, Src::kSavedBits>{});
      } else if (mask.record != nullptr) {
        tiles(std::integral_constant<Src, Src::kOutRecord>{});
      }
    }
    // without a mask: every tile (after a masked call j == Wv already, and this adds none)
    tiles(std::integral_constant<Src, Src::kOut>{});
    for (; j < W; ++j) {  // positions past the last full vector (k == 1, C % K != 0)
      A bd = A(0), bx = A(0);
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t e = (gb + i) * W + j;
        const A dz = relu_grad_scalar(static_cast<A>(dy[e]), static_cast<A>(y[e]));
        bd += dz;
        bx += dz * (static_cast<A>(x[e]) - mean[j]);
      }
      psdz[j] += bd;
      psdzx[j] += bx;
    }
  }
  flush();
}

// Per-channel sums of the rows layout: chunk sums in parallel (per position, then the k positions
// of each channel folded), added in chunk order, then the leftover rows. mean_ext: the means
// repeated over a super-row. mask: where the super-rows' ReLU mask comes from (RowMask).
template <typename T>
void rows_sums(
    const BwdArgs<T>& a, const RowPlan& plan, const acc_type<T>* mean_ext, Sums* out,
    const RowMask& mask = RowMask{}) {
  using A = acc_type<T>;
  const int64_t C = plan.C, k = plan.k, W = plan.W, P = plan.P;
  std::vector<Sums> part(P * C);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    std::vector<double> totals(2 * W);
    std::vector<A> partials(2 * W);
    double* sdz = totals.data();
    double* sdzx = sdz + W;
    for (int64_t p = p0; p < p1; ++p) {
      rows_chunk_sums(
          a.dy, a.y, a.x, W, plan.chunk_begin(p), plan.chunk_end(p), mean_ext, sdz, sdzx,
          partials.data(), partials.data() + W, mask);
      for (int64_t c = 0; c < C; ++c) {  // fold the k positions of each channel
        Sums s;
        for (int64_t q = 0; q < k; ++q) {
          s.dz += sdz[q * C + c];
          s.dzx += sdzx[q * C + c];
        }
        part[p * C + c] = s;
      }
    }
  });

  for (int64_t c = 0; c < C; ++c) {
    Sums s;
    for (int64_t p = 0; p < P; ++p) {
      s.dz += part[p * C + c].dz;
      s.dzx += part[p * C + c].dzx;
    }
    if (plan.Rl > 0) {  // leftover rows (k > 1 only)
      const int64_t o = plan.G * W + c;
      for (int64_t i = 0; i < plan.Rl; ++i) {
        const int64_t e = o + i * C;
        const A dz = relu_grad_scalar(static_cast<A>(a.dy[e]), static_cast<A>(a.y[e]));
        s.dz += dz;
        s.dzx += dz * (static_cast<A>(a.x[e]) - a.mean[c]);
      }
    }
    out[c] = s;
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
// super-rows' ReLU mask bits (RowMask::bits), or null.
template <typename T, typename F>
void rows_apply(
    const BwdArgs<T>& a, const RowPlan& plan, const RowCoefs<acc_type<T>>& k,
    const acc_type<T>* mean_ext, const MaskWord* mask = nullptr) {
  auto apply = [&](int64_t o, int64_t len, auto use_mask) {
    constexpr bool kMask = decltype(use_mask)::value;
    apply_span<T, F, true, kMask>(
        a.dx + o, F::kResGrad ? a.dr + o : nullptr, a.dy + o, a.y + o, a.x + o, len, k.a.data(),
        k.b.data(), mean_ext, k.d.data(), kMask ? mask + o / 8 : nullptr);
  };
  auto apply_rows = [&](int64_t g0, int64_t g1, auto use_mask) {
    for (int64_t g = g0; g < g1; ++g) {
      apply(g * plan.W, plan.W, use_mask);
    }
  };
  at::parallel_for(0, plan.P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      bool masked = false;
      if constexpr (kMaskableType<T>) {
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
    if (F::kNT) {
      stream_fence();
    }
  });
}

template <typename T>
std::vector<acc_type<T>> repeated_means(const BwdArgs<T>& a, const RowPlan& plan) {
  std::vector<acc_type<T>> mean_ext(a.mean, a.mean + a.C);
  repeat_channels(mean_ext, a.C, plan.W);
  return mean_ext;
}

// ------------------------------------------------------------------------------------------
// The three ops on a non-empty input. bn_act_bwd: the reduce and apply passes; planes with
// enough channels run channel-local (a task keeps its channel's dy, y, x in L2 between the two),
// rows reduce and apply the same chunk on the same thread. bn_act_bwd_reduce: the reduce pass;
// bn_act_bwd_apply: the apply pass with coefficients from given means.

template <typename T>
struct ParamGrads {
  bool batch_stats;
  acc_type<T>* gw;  // Σdz·x̂
  acc_type<T>* gb;  // Σdz
};

// Writes channel c's parameter gradients and returns its coefficients.
template <typename T>
C10_ALWAYS_INLINE Coef<acc_type<T>> finalize_channel(
    const BwdArgs<T>& a, const ParamGrads<T>& pg, int64_t c, const Sums& s, int64_t M) {
  using A = acc_type<T>;
  const A gw = sum_dz_xhat(s, a.invstd[c]);
  pg.gw[c] = gw;
  const A gb = static_cast<A>(s.dz);
  pg.gb[c] = gb;
  if (pg.batch_stats && M > 0) {
    return batch_coef(a.w[c], a.invstd[c], gw, gb, A(1) / A(M));
  }
  return running_coef(a.w[c], a.invstd[c]);
}

template <typename T, typename F>
void bwd_planes(const BwdArgs<T>& a, const ParamGrads<T>& pg) {
  using A = acc_type<T>;
  const PlaneTasks tasks(a.N, a.C, a.S, at::get_num_threads());
  if (tasks.P == 1) {
    // channel-local: reduce + apply in one task, the channel's dy, y, x stay in L2
    at::parallel_for(0, tasks.count(), tasks.grain(), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const Coef<A> k = finalize_channel(a, pg, c, task_sums(a, tasks, c), tasks.M);
        apply_task<T, F>(a, tasks, c, k);
      }
      if (F::kNT) {
        stream_fence();
      }
    });
    return;
  }
  std::vector<Sums> sums(a.C);
  planes_sums(a, tasks, sums.data());
  std::vector<Coef<A>> coef(a.C);
  for (int64_t c = 0; c < a.C; ++c) {
    coef[c] = finalize_channel(a, pg, c, sums[c], tasks.M);
  }
  planes_apply<T, F>(a, tasks, coef.data());
}

template <typename T, typename F>
void bwd_rows(const BwdArgs<T>& a, const ParamGrads<T>& pg) {
  using A = acc_type<T>;
  const RowPlan plan(a.C, a.N * a.S, VecT<T>::kStep, at::get_num_threads());
  const std::vector<A> mean_ext = repeated_means(a, plan);
  std::vector<Sums> sums(a.C);
  const RowMask mask = row_mask<T>(plan, a.relu_mask);
  rows_sums(a, plan, mean_ext.data(), sums.data(), mask);
  std::vector<Coef<A>> coef(a.C);
  for (int64_t c = 0; c < a.C; ++c) {
    coef[c] = finalize_channel(a, pg, c, sums[c], a.N * a.S);
  }
  rows_apply<T, F>(a, plan, RowCoefs<A>(coef, plan.W), mean_ext.data(), mask.bits());
}

template <typename T>
void bwd_reduce(const BwdArgs<T>& a, const Geometry& g, acc_type<T>* gw, acc_type<T>* gb) {
  using A = acc_type<T>;
  const int64_t threads = at::get_num_threads();
  std::vector<Sums> sums(a.C);
  if (g.rows) {
    const RowPlan plan(a.C, g.M(), VecT<T>::kStep, threads);
    rows_sums(a, plan, repeated_means(a, plan).data(), sums.data());
  } else {
    planes_sums(a, PlaneTasks(a.N, a.C, a.S, threads), sums.data());
  }
  for (int64_t c = 0; c < a.C; ++c) {
    gw[c] = sum_dz_xhat(sums[c], a.invstd[c]);
    gb[c] = static_cast<A>(sums[c].dz);
  }
}

template <typename T, typename F>
void bwd_apply(
    const BwdArgs<T>& a, const Geometry& g, const acc_type<T>* mean_dz,
    const acc_type<T>* mean_dz_xhat) {
  using A = acc_type<T>;
  const int64_t threads = at::get_num_threads();
  std::vector<Coef<A>> coef(a.C);
  for (int64_t c = 0; c < a.C; ++c) {
    coef[c] = batch_coef(a.w[c], a.invstd[c], mean_dz_xhat[c], mean_dz[c], A(1));
  }
  if (g.rows) {
    const RowPlan plan(a.C, g.M(), VecT<T>::kStep, threads);
    rows_apply<T, F>(a, plan, RowCoefs<A>(coef, plan.W), repeated_means(a, plan).data());
  } else {
    planes_apply<T, F>(a, PlaneTasks(a.N, a.C, a.S, threads), coef.data());
  }
}

// ------------------------------------------------------------------------------------------
// Host side shared by the three ops.

// weight, mean and invstd read into acc_t vectors, and the pointers of the activations.
template <typename T>
struct BwdBuffers {
  std::vector<acc_type<T>> w, mean, invstd;
  BwdArgs<T> args;
  BwdBuffers(
      const BwdOperands& in, const std::optional<at::Tensor>& weight, const at::Tensor& mean_t,
      const at::Tensor& invstd_t, at::Tensor* dx, at::Tensor* dr,
      const MaskWord* relu_mask = nullptr)
      : w(in.g.C), mean(in.g.C), invstd(in.g.C) {
    using A = acc_type<T>;
    const int64_t C = in.g.C;
    read_param<A>(weight, C, A(1), w.data());
    read_param<A>(mean_t, C, A(0), mean.data());
    read_param<A>(invstd_t, C, A(1), invstd.data());
    args.dy = in.grad_out.const_data_ptr<T>();
    args.y = in.out.const_data_ptr<T>();
    args.x = in.g.x.const_data_ptr<T>();
    args.dx = dx != nullptr ? dx->mutable_data_ptr<T>() : nullptr;
    args.dr = dr != nullptr ? dr->mutable_data_ptr<T>() : nullptr;
    args.N = in.g.N;
    args.C = C;
    args.S = in.g.S;
    args.w = w.data();
    args.mean = mean.data();
    args.invstd = invstd.data();
    args.relu_mask = relu_mask;
  }
};

// The bits of bn_act_bwd's relu_mask (checked by the op contract: empty, or what
// bn_act_fwd_train returns for this input), or null where out gives the mask (empty; or a layout
// or dtype whose kernel keeps no mask: then the forward returned zeros and out is read).
const MaskWord* saved_mask_bits(const at::Tensor& relu_mask) {
  return relu_mask.numel() == 0 ? nullptr : relu_mask.const_data_ptr<MaskWord>();
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& out,
    const at::Tensor& relu_mask,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    bool batch_stats,
    bool residual_grad) {
  constexpr const char* op = "bn_act_bwd";
  const BwdOperands in =
      bwd_operands(grad_out, out, relu_mask, input, weight, mean, invstd, cpu_relu_mask_bytes);
  const Geometry& g = in.g;
  const at::Tensor mask = relu_mask.contiguous();
  const MaskWord* saved_mask = saved_mask_bits(mask);
  const auto stat_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor dx = empty_activation(g);
  at::Tensor dr = residual_grad ? empty_activation(g) : at::empty({0}, input.options());
  at::Tensor gw = at::empty({g.C}, stat_opts);
  at::Tensor gb = at::empty({g.C}, stat_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), op, [&] {
    using A = acc_type<scalar_t>;
    const ParamGrads<scalar_t> pg{batch_stats, gw.mutable_data_ptr<A>(), gb.mutable_data_ptr<A>()};
    if (g.M() == 0 || g.C == 0) {
      std::fill(pg.gw, pg.gw + g.C, A(0));
      std::fill(pg.gb, pg.gb + g.C, A(0));
      return;
    }
    const BwdBuffers<scalar_t> buf(
        in, weight, mean, invstd, &dx, residual_grad ? &dr : nullptr, saved_mask);
    // bytes of activations touched: dy, y (or the mask), x read; dx (and dr) written
    const int64_t bytes = g.numel() * int64_t(sizeof(scalar_t)) * (residual_grad ? 5 : 4);
    const bool nt = use_streaming_stores(bytes, Pass::kTwo);
    auto run = [&](auto res_c, auto nt_c) {
      constexpr bool kRes = decltype(res_c)::value;
      constexpr bool kNT = decltype(nt_c)::value;
      if (batch_stats) {
        using F = BwdFlags<true, kRes, kNT>;
        g.rows ? bwd_rows<scalar_t, F>(buf.args, pg) : bwd_planes<scalar_t, F>(buf.args, pg);
      } else {
        using F = BwdFlags<false, kRes, kNT>;
        g.rows ? bwd_rows<scalar_t, F>(buf.args, pg) : bwd_planes<scalar_t, F>(buf.args, pg);
      }
    };
    dispatch_bools(residual_grad, nt, run);
  });
  return {dx, dr, gw, gb};
}

std::tuple<at::Tensor, at::Tensor> bn_act_bwd_reduce_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& out,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& invstd) {
  constexpr const char* op = "bn_act_bwd_reduce";
  const BwdOperands in = bwd_reduce_operands(grad_out, out, input, mean, invstd);
  const Geometry& g = in.g;
  const auto stat_opts = input.options().dtype(acc_dtype(input.scalar_type()));
  at::Tensor sum_dz_xhat = at::empty({g.C}, stat_opts);
  at::Tensor sum_dz = at::empty({g.C}, stat_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), op, [&] {
    using A = acc_type<scalar_t>;
    A* gw = sum_dz_xhat.mutable_data_ptr<A>();
    A* gb = sum_dz.mutable_data_ptr<A>();
    if (g.M() == 0 || g.C == 0) {
      std::fill(gw, gw + g.C, A(0));
      std::fill(gb, gb + g.C, A(0));
      return;
    }
    const BwdBuffers<scalar_t> buf(in, std::nullopt, mean, invstd, nullptr, nullptr);
    bwd_reduce(buf.args, g, gw, gb);
  });
  return {sum_dz_xhat, sum_dz};
}

std::tuple<at::Tensor, at::Tensor> bn_act_bwd_apply_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& mean_dz,
    const at::Tensor& mean_dz_xhat,
    bool residual_grad) {
  constexpr const char* op = "bn_act_bwd_apply";
  const BwdOperands in = bwd_apply_operands(
      grad_out, out, input, weight, mean, invstd, mean_dz, mean_dz_xhat);
  const Geometry& g = in.g;
  at::Tensor dx = empty_activation(g);
  at::Tensor dr = residual_grad ? empty_activation(g) : at::empty({0}, input.options());
  if (g.numel() == 0) {
    return {dx, dr};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), op, [&] {
    using A = acc_type<scalar_t>;
    std::vector<A> mdz(g.C), mdzx(g.C);
    read_param<A>(mean_dz, g.C, A(0), mdz.data());
    read_param<A>(mean_dz_xhat, g.C, A(0), mdzx.data());
    const BwdBuffers<scalar_t> buf(in, weight, mean, invstd, &dx, residual_grad ? &dr : nullptr);
    // bytes of activations touched: dy, y, x read; dx (and dr) written
    const int64_t bytes = g.numel() * int64_t(sizeof(scalar_t)) * (residual_grad ? 5 : 4);
    // (one pass here, but the second of a training backward split around a collective)
    const bool nt = use_streaming_stores(bytes, Pass::kTwo);
    dispatch_bools(residual_grad, nt, [&](auto res_c, auto nt_c) {
      using F = BwdFlags<true, decltype(res_c)::value, decltype(nt_c)::value>;
      bwd_apply<scalar_t, F>(buf.args, g, mdz.data(), mdzx.data());
    });
  });
  return {dx, dr};
}

} // namespace fused_resnet::cpu
