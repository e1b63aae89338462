// The backward's pieces over one contiguous span: the reduce pass's per-channel sums Σdz and
// Σdz·(x − mean), and the apply pass dx = a·dz + b·(x − mean) + d, dr = dz, with the coefficients
// a, b, d of batch or running statistics (bwd.cpp states the math); and dz = dy·act'(.) of one
// element or vector, the activation the kernels' compile-time Fn (act_math.h).
#pragma once

#include "act_math.h"
#include "plans.h"
#include "act_mask.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fused_resnet::cpu {

// The apply pass's compile-time flags. Whether it streams dx and dr past the cache is a run-time
// argument (BwdArgs::stream): a branch per vector store that the predictor always gets right,
// where a template flag compiled every apply kernel twice (a third of bwd.cpp's build time).
template <bool kBatchStats_, bool kResGrad_>
struct BwdFlags {
  static constexpr bool kBatchStats = kBatchStats_;  // batch_stats: dx has the mean terms
  static constexpr bool kResGrad = kResGrad_;        // write grad_residual (residual_grad)
};

// Per-channel totals of the reduce pass, in double whatever the dtype. Σdz·(x − mean) over a
// channel's N·S elements can cancel to far less than its partial sums (eval mode, where mean is
// the running mean, or a gradient that sums to ~0): fp32 block sums (a kBlockBytes span, or
// kRowBlock rows, at most 4 blocks of them in the rows layout) are exact enough, but thousands
// of them added into an fp32 total lose the result. Adding them in double costs one add per
// block. sum_dz_xmu is taken about the mean the backward is given (not times invstd): Σdz·x̂ is
// invstd·sum_dz_xmu (sum_dz_xhat_of below).
struct Sums {
  double sum_dz = 0;      // Σdz
  double sum_dz_xmu = 0;  // Σdz·(x − mean)
};

// out[c] = the sums of channel c over P chunks (part[p·C + c]) added in chunk order: the same
// bits for a given partition, whichever thread ran which chunk.
inline void add_chunk_sums(const std::vector<Sums>& part, int64_t P, int64_t C, Sums* out) {
  for (int64_t c = 0; c < C; ++c) {
    Sums s;
    for (int64_t p = 0; p < P; ++p) {
      s.sum_dz += part[p * C + c].sum_dz;
      s.sum_dz_xmu += part[p * C + c].sum_dz_xmu;
    }
    out[c] = s;
  }
}

// ------------------------------------------------------------------------------------------
// dz = dy·act'(.) from what the activation's backward reads (ActFn): out's side of the kink
// (piecewise linear: y, or mask bits in its stead), z recomputed (smooth), or nothing
// (identity: dz = dy). The recomputation, with the statistics the backward is given (batch or
// running alike), the parameters and the residual:
//   z = (x − mean)·zscale + zshift (+ r),  zscale = w·invstd (the apply's coefficient A),
//   zshift = bias
// kRes: z adds the residual (only an activation that recomputes z is given one). xmu = x − mean.
// The operands the activation does not read are not looked at: callers leave them unset, and
// read out, x and r only where the activation needs them (out: 1 read of an activation; z:
// x, read anyway by the reduce pass, and r; no operand at all for identity).

template <typename A>
C10_ALWAYS_INLINE A fmadd_of(A a, A b, A c) {
  return std::fma(a, b, c);
}
template <typename A>
C10_ALWAYS_INLINE at::vec::Vectorized<A> fmadd_of(
    const at::vec::Vectorized<A>& a, const at::vec::Vectorized<A>& b,
    const at::vec::Vectorized<A>& c) {
  return at::vec::fmadd(a, b, c);
}

// dz of a vector (V = Vectorized<A>) or a scalar (V = A).
template <bool kRes, typename Fn, typename V>
C10_ALWAYS_INLINE V dz_of(
    const Fn& act, const V& dy, const V& y, const V& xmu, const V& zscale, const V& zshift,
    const V& r) {
  static_assert(!kRes || Fn::kRecomputesZ, "the residual is read only to recompute z");
  if constexpr (Fn::kReadsOut) {
    return act.grad_off(dy, act.off(y));
  } else if constexpr (Fn::kRecomputesZ) {
    V z = fmadd_of(xmu, zscale, zshift);
    if constexpr (kRes) {
      z = z + r;
    }
    return act.grad_z(dy, z);
  } else {
    return dy;
  }
}

// dz of element e, on the scalar path (span heads and tails, leftover rows): xmu = x[e] − mean,
// zscale and zshift of e's channel.
template <bool kRes, typename T, typename Fn>
C10_ALWAYS_INLINE acc_type<T> dz_at(
    const Fn& act, const T* dy, const T* y, const T* r, int64_t e, acc_type<T> xmu,
    acc_type<T> zscale, acc_type<T> zshift) {
  using A = acc_type<T>;
  return dz_of<kRes>(
      act, static_cast<A>(dy[e]), Fn::kReadsOut ? static_cast<A>(y[e]) : A(0), xmu, zscale,
      zshift, kRes ? static_cast<A>(r[e]) : A(0));
}

// p + o, or null for an operand the op was not given (out, the residual).
template <typename T>
C10_ALWAYS_INLINE const T* at_offset(const T* p, int64_t o) {
  return p != nullptr ? p + o : nullptr;
}

// ------------------------------------------------------------------------------------------
// Planes layout: Σdz and Σdz·(x − mean) over one contiguous span (constant mean, zscale,
// zshift).

template <typename T, typename Fn, bool kRes>
C10_ALWAYS_INLINE void reduce_span_block(
    const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x,
    const T* __restrict__ r, int64_t L, acc_type<T> mean, acc_type<T> zscale,
    acc_type<T> zshift, const Fn& act, Sums& out) {
  using V = VecT<T>;
  using A = typename V::acc_t;
  using AV = typename V::AV;
  constexpr int64_t K = V::kStep;
  constexpr int64_t P = V::kParts;
  constexpr int64_t U = 4 / P;  // 4 independent chains per sum (8 in all)
  constexpr int64_t NA = U * P;
  const AV zero(A(0));
  const AV mv(mean);
  const AV zs(zscale);
  const AV zb(zshift);
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
      AV g[P], o[P], xv[P], rv[P];
      V::load(dy + j + u * K, g);
      if constexpr (Fn::kReadsOut) {
        V::load(y + j + u * K, o);
      }
      V::load(x + j + u * K, xv);
      if constexpr (kRes) {
        V::load(r + j + u * K, rv);
      }
      FR_UNROLL
      for (int64_t q = 0; q < P; ++q) {
        const AV xm = xv[q] - mv;
        const AV dz = dz_of<kRes>(act, g[q], o[q], xm, zs, zb, rv[q]);
        sd[u * P + q] = sd[u * P + q] + dz;
        sx[u * P + q] = at::vec::fmadd(dz, xm, sx[u * P + q]);
      }
    }
  }
  for (; j + K <= L; j += K) {
    AV g[P], o[P], xv[P], rv[P];
    V::load(dy + j, g);
    if constexpr (Fn::kReadsOut) {
      V::load(y + j, o);
    }
    V::load(x + j, xv);
    if constexpr (kRes) {
      V::load(r + j, rv);
    }
    FR_UNROLL
    for (int64_t q = 0; q < P; ++q) {
      const AV xm = xv[q] - mv;
      const AV dz = dz_of<kRes>(act, g[q], o[q], xm, zs, zb, rv[q]);
      sd[q] = sd[q] + dz;
      sx[q] = at::vec::fmadd(dz, xm, sx[q]);
    }
  }
  A bd = hsum(sum_accumulators(sd));
  A bx = hsum(sum_accumulators(sx));
  for (; j < L; ++j) {
    const A xm = static_cast<A>(x[j]) - mean;
    const A dz = dz_at<kRes>(act, dy, y, r, j, xm, zscale, zshift);
    bd += dz;
    bx += dz * xm;
  }
  out.sum_dz += bd;
  out.sum_dz_xmu += bx;
}

template <typename T, typename Fn, bool kRes>
C10_ALWAYS_INLINE void reduce_span(
    const T* dy, const T* y, const T* x, const T* r, int64_t L, acc_type<T> mean,
    acc_type<T> zscale, acc_type<T> zshift, const Fn& act, Sums& out) {
  constexpr int64_t kBlock = kBlockBytes / sizeof(T);
  for (int64_t lo = 0; lo < L; lo += kBlock) {
    const int64_t len = std::min(kBlock, L - lo);
    reduce_span_block<T, Fn, kRes>(
        dy + lo, at_offset(y, lo), x + lo, at_offset(r, lo), len, mean, zscale, zshift, act,
        out);
  }
}

// ------------------------------------------------------------------------------------------
// Apply over one contiguous span: dx = A·dz + B·(x − mean) + D; dr = dz. kPerPos: coefficient
// arrays indexed like the span (rows layout), otherwise coefficient[0] constants. A = w·invstd
// is also z's scale (dz_of), cshift its shift (the bias). x is read where dx has the mean terms
// (F::kBatchStats) or dz recomputes z.

// kMask: whole vectors take the activation's side from the bits `mask` (act_mask.h; byte 0
// starts at the span's element 0) instead of reading y; the scalar head and tail still read y.
// The span from element `head` on, whose elements [0, head) go through the scalar path first
// (stream: to align dx, dr for stream_vec; apply_span picks it). dy may be dx: each element is
// read before it is written (the apply over a dz the reduce pass kept in dx, bwd.cpp), so
// neither is __restrict__.
template <typename T, typename Fn, bool kRes, typename F, bool kPerPos, bool kMask>
C10_ALWAYS_INLINE void apply_span_from(
    bool stream, int64_t head, T* dx, T* __restrict__ dr, const T* dy,
    const T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ r, int64_t L,
    const acc_type<T>* __restrict__ cA, const acc_type<T>* __restrict__ cB,
    const acc_type<T>* __restrict__ cmean, const acc_type<T>* __restrict__ cD,
    const acc_type<T>* __restrict__ cshift, const MaskWord* __restrict__ mask, const Fn& act) {
  using V = VecT<T>;
  using A = typename V::acc_t;
  using AV = typename V::AV;
  constexpr int64_t K = V::kStep;
  constexpr int64_t P = V::kParts;
  constexpr int64_t H = AV::size();
  constexpr bool kReadsX = F::kBatchStats || Fn::kRecomputesZ;
  static_assert(!kMask || Fn::kReadsOut, "only a piecewise-linear activation keeps a mask");
  auto scalar = [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const A a = kPerPos ? cA[j] : cA[0];
      const A m = kPerPos ? cmean[j] : cmean[0];
      const A xm = kReadsX ? static_cast<A>(x[j]) - m : A(0);
      const A dz = dz_at<kRes>(act, dy, y, r, j, xm, a, kPerPos ? cshift[j] : cshift[0]);
      A v;
      if constexpr (F::kBatchStats) {
        const A b = kPerPos ? cB[j] : cB[0];
        const A d = kPerPos ? cD[j] : cD[0];
        v = std::fma(a, dz, std::fma(b, xm, d));
      } else {
        v = a * dz;
      }
      dx[j] = static_cast<T>(v);
      if constexpr (F::kResGrad) {
        dr[j] = static_cast<T>(dz);
      }
    }
  };
  int64_t j = std::min(head, L);
  scalar(0, j);
  const AV a0(cA[0]);
  AV b0(A(0)), m0(A(0)), d0(A(0)), s0(A(0));
  if constexpr (F::kBatchStats) {
    b0 = AV(cB[0]);
    d0 = AV(cD[0]);
  }
  if constexpr (kReadsX) {
    m0 = AV(cmean[0]);
  }
  if constexpr (Fn::kRecomputesZ) {
    s0 = AV(cshift[0]);
  }
  for (; j + K <= L; j += K) {
    AV g[P], o[P], xv[P], rv[P], res[P], dzs[P];
    V::load(dy + j, g);
    if constexpr (Fn::kReadsOut && !kMask) {
      V::load(y + j, o);
    }
    if constexpr (kReadsX) {
      V::load(x + j, xv);
    }
    if constexpr (kRes) {
      V::load(r + j, rv);
    }
    FR_UNROLL
    for (int64_t q = 0; q < P; ++q) {
      const int64_t i = j + q * H;
      AV xm;
      if constexpr (kReadsX) {
        xm = xv[q] - (kPerPos ? AV::loadu(cmean + i) : m0);
      }
      AV dz;
      if constexpr (kMask) {
        dz = act.grad_off(g[q], lanes_from_bits(mask[i / 8]));
      } else if constexpr (kPerPos) {
        dz = dz_of<kRes>(act, g[q], o[q], xm, AV::loadu(cA + i), AV::loadu(cshift + i), rv[q]);
      } else {
        dz = dz_of<kRes>(act, g[q], o[q], xm, a0, s0, rv[q]);
      }
      dzs[q] = dz;
      if constexpr (F::kBatchStats) {
        if constexpr (kPerPos) {
          const AV t = at::vec::fmadd(AV::loadu(cB + i), xm, AV::loadu(cD + i));
          res[q] = at::vec::fmadd(AV::loadu(cA + i), dz, t);
        } else {
          res[q] = at::vec::fmadd(a0, dz, at::vec::fmadd(b0, xm, d0));
        }
      } else {
        res[q] = kPerPos ? AV::loadu(cA + i) * dz : a0 * dz;
      }
    }
    if (stream) {
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

// Apply over one contiguous span. Streaming stores (stream) need dx (and dr) aligned alike for
// stream_vec after a scalar head: a span with no such head, or one whose head would shift the
// vectors off the mask bytes (kMask), takes plain stores. (One inlined body whichever it takes.)
template <typename T, typename Fn, bool kRes, typename F, bool kPerPos, bool kMask = false>
C10_ALWAYS_INLINE void apply_span(
    bool stream, T* dx, T* __restrict__ dr, const T* dy, const T* __restrict__ y,
    const T* __restrict__ x, const T* __restrict__ r, int64_t L,
    const acc_type<T>* __restrict__ cA, const acc_type<T>* __restrict__ cB,
    const acc_type<T>* __restrict__ cmean, const acc_type<T>* __restrict__ cD,
    const acc_type<T>* __restrict__ cshift, const Fn& act,
    const MaskWord* __restrict__ mask = nullptr) {
  int64_t head = 0;
  if (stream) {
    head = stream_head(dx);
    stream = head >= 0 && !(F::kResGrad && stream_head(dr) != head) && !(kMask && head != 0);
    head = stream ? head : 0;
  }
  apply_span_from<T, Fn, kRes, F, kPerPos, kMask>(
      stream, head, dx, dr, dy, y, x, r, L, cA, cB, cmean, cD, cshift, mask, act);
}

template <typename T>
struct BwdArgs {
  const T* dy;
  const T* y;  // out where the activation's backward reads it (ActFn::kReadsOut), else null
  const T* x;
  const T* r;  // the residual a recomputed z adds (ActFn::kRecomputesZ, one given), else null
  T* dx;  // nullptr in bn_act_bwd_reduce
  T* dr;  // nullptr unless residual_grad
  int64_t N, C, S;
  const acc_type<T>* w;
  const acc_type<T>* mean;
  const acc_type<T>* invstd;
  // z = (x − mean)·zscale + zshift (+ r) recomputed (dz_of): zscale = w·invstd, zshift = bias
  const acc_type<T>* zscale;
  const acc_type<T>* zshift;
  const MaskWord* act_mask;  // bn_act_bwd: the bits bn_act_fwd_train saved, or null
  bool stream;  // the apply pass streams dx, dr past the cache (use_streaming_stores)
};

template <typename A>
struct Coef {
  A a, b, d;
};

// grad_input = a·dz + b·(x − mean) + d with a = w·invstd and, for batch statistics,
//   b = −a·invstd·mean_dz_xhat,  d = −a·mean_dz,
// from this input's sums (mean_dz = sum_dz·inv_count, mean_dz_xhat = sum_dz_xhat·inv_count,
// inv_count = 1/M) ...
template <typename A>
C10_ALWAYS_INLINE Coef<A> batch_coef(A w, A invstd, A sum_dz_xhat, A sum_dz, A inv_count) {
  Coef<A> k;
  k.a = w * invstd;
  k.b = -k.a * invstd * sum_dz_xhat * inv_count;
  k.d = -k.a * sum_dz * inv_count;
  return k;
}

// ... or from given means (over all processes: bn_act_bwd_apply).
template <typename A>
C10_ALWAYS_INLINE Coef<A> batch_coef_of_means(A w, A invstd, A mean_dz_xhat, A mean_dz) {
  Coef<A> k;
  k.a = w * invstd;
  k.b = -k.a * invstd * mean_dz_xhat;
  k.d = -k.a * mean_dz;
  return k;
}

// Running statistics: the mean terms vanish.
template <typename A>
C10_ALWAYS_INLINE Coef<A> running_coef(A w, A invstd) {
  return Coef<A>{w * invstd, A(0), A(0)};
}

// Σdz·x̂ = invstd·Σdz·(x − mean): grad_weight of this input.
template <typename A>
C10_ALWAYS_INLINE A sum_dz_xhat_of(const Sums& s, A invstd) {
  return static_cast<A>(s.sum_dz_xmu * static_cast<double>(invstd));
}

} // namespace fused_resnet::cpu
