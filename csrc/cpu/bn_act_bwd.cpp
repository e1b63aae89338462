// Backward CPU kernel of both forwards (bn_act_bwd).
//
//   dz = (out <= 0) ? 0 : grad_out                  (aten threshold_backward; NaN out passes)
//   grad_bias = Σdz,  grad_weight = Σdz·x̂ = invstd·Σdz·(x − mean)
//   grad_input = A·dz + B·(x − mean) + D,  A = w·invstd,
//       B = −A·invstd·grad_weight/M, D = −A·grad_bias/M     when batch_stats
//       B = D = 0 (x is not even read)                       otherwise
//   grad_residual = dz                                       when residual_grad
//
// One reduce pass (reads dy, y, x) and one apply pass (reads dy, y, x; writes dx, dr). Sums
// are two-level: vector accumulators over a block, then added to the running total in a fixed
// order (deterministic for a given thread count). Layouts and parallel decomposition mirror the
// forward (bn_act_fwd.cpp): in the planes layout a channel-local task keeps the channel's three
// inputs in L2 between its two passes; in the rows layout each thread reduces and then applies
// its own contiguous chunk of rows.
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

template <typename A>
struct Sums {
  A dz = A(0);
  A dzx = A(0);  // Σdz·(x − mean)
};

// ------------------------------------------------------------------------------------------
// Planes layout: Σdz and Σdz·(x − mean) over one contiguous span (constant mean).

template <typename T>
C10_ALWAYS_INLINE void reduce_span_block(
    const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x, int64_t L,
    acc_type<T> mean, Sums<acc_type<T>>& out) {
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
    const T* dy, const T* y, const T* x, int64_t L, acc_type<T> mean, Sums<acc_type<T>>& out) {
  constexpr int64_t kBlock = kBlockBytes / sizeof(T);
  for (int64_t lo = 0; lo < L; lo += kBlock) {
    const int64_t len = std::min(kBlock, L - lo);
    reduce_span_block(dy + lo, y + lo, x + lo, len, mean, out);
  }
}

// ------------------------------------------------------------------------------------------
// Apply over one contiguous span: dx = A·dz + B·(x − mean) + D; dr = dz. kPerPos: coefficient
// arrays indexed like the span (rows layout), otherwise coefficient[0] constants.

template <typename T, typename F, bool kPerPos>
C10_ALWAYS_INLINE void apply_span(
    T* __restrict__ dx, T* __restrict__ dr, const T* __restrict__ dy, const T* __restrict__ y,
    const T* __restrict__ x, int64_t L, const acc_type<T>* __restrict__ cA,
    const acc_type<T>* __restrict__ cB, const acc_type<T>* __restrict__ cmean,
    const acc_type<T>* __restrict__ cD) {
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
      apply_span<T, Plain, kPerPos>(dx, dr, dy, y, x, L, cA, cB, cmean, cD);
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
    V::load(y + j, o);
    if constexpr (F::kBatch) {
      V::load(x + j, xv);
    }
    FR_UNROLL
    for (int64_t q = 0; q < P; ++q) {
      const AV dz = relu_grad_vec(g[q], o[q], zero);
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
  T* dx;
  T* dr;  // nullptr unless residual_grad
  int64_t N, C, S;
  const acc_type<T>* w;
  const acc_type<T>* mean;
  const acc_type<T>* invstd;
  bool batch_stats;
  acc_type<T>* gw;
  acc_type<T>* gb;
};

template <typename A>
struct Coef {
  A a, b, d;
};

// Per-channel coefficients from the sums; also writes grad_weight and grad_bias.
template <typename T>
C10_ALWAYS_INLINE Coef<acc_type<T>> finalize_channel(
    const BwdArgs<T>& args, int64_t c, const Sums<acc_type<T>>& s, int64_t M) {
  using A = acc_type<T>;
  const A invstd = args.invstd[c];
  const A gw = s.dzx * invstd;
  args.gw[c] = gw;
  args.gb[c] = s.dz;
  Coef<A> k;
  k.a = args.w[c] * invstd;
  k.b = A(0);
  k.d = A(0);
  if (args.batch_stats && M > 0) {
    const A inv_m = A(1) / A(M);
    k.b = -k.a * invstd * gw * inv_m;
    k.d = -k.a * s.dz * inv_m;
  }
  return k;
}

template <typename T, typename F>
C10_ALWAYS_INLINE void apply_channel_range(
    const BwdArgs<T>& a, int64_t c, int64_t o, int64_t len, const Coef<acc_type<T>>& k) {
  apply_span<T, F, false>(
      a.dx + o, F::kResGrad ? a.dr + o : nullptr, a.dy + o, a.y + o, a.x + o, len, &k.a, &k.b,
      a.mean + c, &k.d);
}

template <typename F>
C10_ALWAYS_INLINE void for_channel_range(
    int64_t C, int64_t S, int64_t c, int64_t e0, int64_t e1, const F& f) {
  int64_t e = e0;
  while (e < e1) {
    const int64_t n = e / S;
    const int64_t s = e - n * S;
    const int64_t len = std::min(S - s, e1 - e);
    f((n * C + c) * S + s, len);
    e += len;
  }
}

template <typename T, typename F>
void bwd_planes(const BwdArgs<T>& a) {
  using A = acc_type<T>;
  const int64_t N = a.N, C = a.C, S = a.S, M = N * S;
  const int64_t threads = at::get_num_threads();
  const int64_t P = plan_plane_splits(C, M, threads);

  if (P == 1) {
    // channel-local: reduce + apply in one task, the channel's dy, y, x stay in L2
    const int64_t grain = std::max<int64_t>(1, kParallelMinElems / std::max<int64_t>(M, 1));
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Sums<A> s;
        for (int64_t n = 0; n < N; ++n) {
          const int64_t o = (n * C + c) * S;
          reduce_span(a.dy + o, a.y + o, a.x + o, S, a.mean[c], s);
        }
        const Coef<A> k = finalize_channel(a, c, s, M);
        for (int64_t n = 0; n < N; ++n) {
          apply_channel_range<T, F>(a, c, (n * C + c) * S, S, k);
        }
      }
      if (F::kNT) {
        stream_fence();
      }
    });
    return;
  }

  // split: C*P tasks (channel c = t / P, part t % P of its M elements)
  std::vector<Sums<A>> part(C * P);
  at::parallel_for(0, C * P, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t / P, p = t % P;
      Sums<A> s;
      for_channel_range(C, S, c, M * p / P, M * (p + 1) / P, [&](int64_t o, int64_t len) {
        reduce_span(a.dy + o, a.y + o, a.x + o, len, a.mean[c], s);
      });
      part[t] = s;
    }
  });
  std::vector<Coef<A>> coef(C);
  for (int64_t c = 0; c < C; ++c) {
    Sums<A> s;
    for (int64_t p = 0; p < P; ++p) {
      s.dz += part[c * P + p].dz;
      s.dzx += part[c * P + p].dzx;
    }
    coef[c] = finalize_channel(a, c, s, M);
  }
  at::parallel_for(0, C * P, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t / P, p = t % P;
      for_channel_range(C, S, c, M * p / P, M * (p + 1) / P, [&](int64_t o, int64_t len) {
        apply_channel_range<T, F>(a, c, o, len, coef[c]);
      });
    }
    if (F::kNT) {
      stream_fence();
    }
  });
}

// ------------------------------------------------------------------------------------------
// Rows layout.

// Per-position Σdz and Σdz·(x − mean) of a tile of NS vector steps (positions [j, j + NS*K))
// over rows [r0, r0 + nr) of width W; added to sdz/sdzx (the block total goes in in one add).
template <typename T, int64_t NS>
C10_ALWAYS_INLINE void rows_reduce_tile(
    const T* __restrict__ dy, const T* __restrict__ y, const T* __restrict__ x, int64_t W,
    int64_t r0, int64_t nr, int64_t j, const acc_type<T>* __restrict__ mean,
    acc_type<T>* __restrict__ sdz, acc_type<T>* __restrict__ sdzx) {
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
      V::load(y + o + u * K, ov);
      V::load(x + o + u * K, xv);
      FR_UNROLL
      for (int64_t q = 0; q < P; ++q) {
        const AV dz = relu_grad_vec(g[q], ov[q], zero);
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

// Per-position sums over super-rows [g0, g1) of width W, in blocks of kRowBlock rows.
template <typename T>
void rows_chunk_sums(
    const T* dy, const T* y, const T* x, int64_t W, int64_t g0, int64_t g1,
    const acc_type<T>* mean, acc_type<T>* sdz, acc_type<T>* sdzx) {
  using V = VecT<T>;
  using A = typename V::acc_t;
  constexpr int64_t K = V::kStep;
  constexpr int64_t NS = kTileVectors / V::kParts;
  const int64_t Wv = W / K * K;
  std::fill(sdz, sdz + W, A(0));
  std::fill(sdzx, sdzx + W, A(0));
  for (int64_t gb = g0; gb < g1; gb += kRowBlock) {
    const int64_t nb = std::min(kRowBlock, g1 - gb);
    int64_t j = 0;
    for (; j + NS * K <= Wv; j += NS * K) {
      rows_reduce_tile<T, NS>(dy, y, x, W, gb, nb, j, mean, sdz, sdzx);
    }
    for (; j < Wv; j += K) {
      rows_reduce_tile<T, 1>(dy, y, x, W, gb, nb, j, mean, sdz, sdzx);
    }
    for (; j < W; ++j) {  // positions past the last full vector (k == 1, C % K != 0)
      A bd = A(0), bx = A(0);
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t e = (gb + i) * W + j;
        const A dz = relu_grad_scalar(static_cast<A>(dy[e]), static_cast<A>(y[e]));
        bd += dz;
        bx += dz * (static_cast<A>(x[e]) - mean[j]);
      }
      sdz[j] += bd;
      sdzx[j] += bx;
    }
  }
}

template <typename T, typename F>
void bwd_rows(const BwdArgs<T>& a) {
  using A = acc_type<T>;
  const int64_t C = a.C, R = a.N * a.S, M = R;
  const int64_t k = plan_row_period(C, VecT<T>::kStep);
  const int64_t W = k * C;
  const int64_t G = R / k;       // full super-rows
  const int64_t Rl = R - G * k;  // leftover rows (< k)
  const int64_t threads = at::get_num_threads();
  const int64_t P = plan_row_chunks(G, R * C, threads);

  std::vector<A> mean_ext(W);
  for (int64_t j = 0; j < W; ++j) {
    mean_ext[j] = a.mean[j % C];
  }

  std::vector<Sums<A>> part(P * C);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    std::vector<A> scratch(2 * W);
    A* sdz = scratch.data();
    A* sdzx = sdz + W;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t g0 = G * p / P, g1 = G * (p + 1) / P;
      rows_chunk_sums(a.dy, a.y, a.x, W, g0, g1, mean_ext.data(), sdz, sdzx);
      for (int64_t c = 0; c < C; ++c) {  // fold the k positions of each channel
        Sums<A> s;
        for (int64_t q = 0; q < k; ++q) {
          s.dz += sdz[q * C + c];
          s.dzx += sdzx[q * C + c];
        }
        part[p * C + c] = s;
      }
    }
  });

  std::vector<A> cA(W), cB(W), cD(W);
  for (int64_t c = 0; c < C; ++c) {
    Sums<A> s;
    for (int64_t p = 0; p < P; ++p) {
      s.dz += part[p * C + c].dz;
      s.dzx += part[p * C + c].dzx;
    }
    if (Rl > 0) {  // leftover rows (k > 1 only)
      const int64_t o = G * W + c;
      for (int64_t i = 0; i < Rl; ++i) {
        const int64_t e = o + i * C;
        const A dz = relu_grad_scalar(static_cast<A>(a.dy[e]), static_cast<A>(a.y[e]));
        s.dz += dz;
        s.dzx += dz * (static_cast<A>(a.x[e]) - a.mean[c]);
      }
    }
    const Coef<A> kc = finalize_channel(a, c, s, M);
    cA[c] = kc.a;
    cB[c] = kc.b;
    cD[c] = kc.d;
  }
  for (int64_t j = C; j < W; ++j) {
    cA[j] = cA[j % C];
    cB[j] = cB[j % C];
    cD[j] = cD[j % C];
  }

  auto apply = [&](int64_t o, int64_t len) {
    apply_span<T, F, true>(
        a.dx + o, F::kResGrad ? a.dr + o : nullptr, a.dy + o, a.y + o, a.x + o, len, cA.data(),
        cB.data(), mean_ext.data(), cD.data());
  };
  // chunk p is applied by the thread that reduced it (same static partition)
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t g0 = G * p / P, g1 = G * (p + 1) / P;
      for (int64_t g = g0; g < g1; ++g) {
        apply(g * W, W);
      }
      if (p == P - 1 && Rl > 0) {
        apply(G * W, Rl * C);
      }
    }
    if (F::kNT) {
      stream_fence();
    }
  });
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& out,
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    bool batch_stats,
    bool residual_grad) {
  constexpr const char* op = "bn_act_bwd";
  const Geometry g = canonicalize_input(input, op);
  const at::Tensor dy = activation_like_input(grad_out, input, g, "grad_out", op);
  const at::Tensor y = activation_like_input(out, input, g, "out", op);
  if (weight.has_value() && weight->defined()) {
    check_param(*weight, input, g.C, "weight", op);
  }
  check_param(mean, input, g.C, "mean", op);
  check_param(invstd, input, g.C, "invstd", op);

  const auto acc = acc_dtype(input.scalar_type());
  const auto stat_opts = input.options().dtype(acc);
  at::Tensor dx = empty_activation(g);
  at::Tensor dr = residual_grad ? empty_activation(g) : at::empty({0}, input.options());
  at::Tensor gw = at::empty({g.C}, stat_opts);
  at::Tensor gb = at::empty({g.C}, stat_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), op, [&] {
    using A = acc_type<scalar_t>;
    const int64_t C = g.C;
    std::vector<A> w(C), mu(C), is(C);
    read_param<A>(weight, C, A(1), w.data());
    read_param<A>(mean, C, A(0), mu.data());
    read_param<A>(invstd, C, A(1), is.data());
    A* gwp = gw.mutable_data_ptr<A>();
    A* gbp = gb.mutable_data_ptr<A>();
    if (g.M() == 0 || C == 0) {
      std::fill(gwp, gwp + C, A(0));
      std::fill(gbp, gbp + C, A(0));
      return;
    }
    BwdArgs<scalar_t> a;
    a.dy = dy.const_data_ptr<scalar_t>();
    a.y = y.const_data_ptr<scalar_t>();
    a.x = g.x.const_data_ptr<scalar_t>();
    a.dx = dx.mutable_data_ptr<scalar_t>();
    a.dr = residual_grad ? dr.mutable_data_ptr<scalar_t>() : nullptr;
    a.N = g.N;
    a.C = C;
    a.S = g.S;
    a.w = w.data();
    a.mean = mu.data();
    a.invstd = is.data();
    a.batch_stats = batch_stats;
    a.gw = gwp;
    a.gb = gbp;
    // bytes of activations touched: dy, y, x read; dx (and dr) written
    const int64_t bytes = g.numel() * int64_t(sizeof(scalar_t)) * (residual_grad ? 5 : 4);
    const bool nt = use_streaming_stores(bytes);
    auto run = [&](auto res_c, auto nt_c) {
      constexpr bool kRes = decltype(res_c)::value;
      constexpr bool kNT = decltype(nt_c)::value;
      if (batch_stats) {
        using F = BwdFlags<true, kRes, kNT>;
        g.rows ? bwd_rows<scalar_t, F>(a) : bwd_planes<scalar_t, F>(a);
      } else {
        using F = BwdFlags<false, kRes, kNT>;
        g.rows ? bwd_rows<scalar_t, F>(a) : bwd_planes<scalar_t, F>(a);
      }
    };
    dispatch_bools(residual_grad, nt, run);
  });
  return {dx, dr, gw, gb};
}

} // namespace fused_resnet::cpu
