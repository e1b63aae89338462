// The forward's apply pass, y = act(x·scale + shift (+ r)) with per-channel scale = w·invstd and
// shift = b − mean·scale, over spans (planes), super-rows (rows) and chunks of them; in training
// it may also write the activation's mask bits (act_mask.h). The activation is the kernels'
// compile-time Fn (act_math.h, ActFn).
#pragma once

#include "act_math.h"
#include "plans.h"
#include "act_mask.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace fused_resnet::cpu {

// ------------------------------------------------------------------------------------------
// Apply: y = act(x·scale + shift (+ r)). kPerPos: scale/shift are per-element arrays (rows
// layout, indexed like the span); otherwise scale[0]/shift[0] are constants (planes layout).
// kMask: also writes the activation's mask bits of the span (act_mask.h; piecewise-linear Fn
// only) to mask, whose byte 0 the span's element 0 starts; whole vectors then start on a byte
// (T computed in float).

// z = x·scale + shift (+ r), activated, for the P parts of the vector at element j.
template <typename T, typename Fn, bool kRes, bool kPerPos>
C10_ALWAYS_INLINE void fwd_apply_vector(
    const typename VecT<T>::AV (&x)[VecT<T>::kParts], const typename VecT<T>::AV (&r)[VecT<T>::kParts],
    int64_t j, const acc_type<T>* __restrict__ scale, const acc_type<T>* __restrict__ shift,
    const Fn& act, typename VecT<T>::AV (&y)[VecT<T>::kParts]) {
  using AV = typename VecT<T>::AV;
  constexpr int64_t H = AV::size();
  FR_UNROLL
  for (int64_t q = 0; q < VecT<T>::kParts; ++q) {
    AV z = kPerPos ? at::vec::fmadd(x[q], AV::loadu(scale + j + q * H), AV::loadu(shift + j + q * H))
                   : at::vec::fmadd(x[q], AV(scale[0]), AV(shift[0]));
    if constexpr (kRes) {
      z = z + r[q];
    }
    y[q] = act.forward(z);
  }
}

// The span from element `head` on, whose elements [0, head) go through the scalar path first
// (stream: to align y for stream_vec; fwd_apply_span picks it).
template <typename T, typename Fn, bool kRes, bool kPerPos, bool kMask>
C10_ALWAYS_INLINE void fwd_apply_span_from(
    bool stream, int64_t head, T* __restrict__ y, const T* __restrict__ x,
    const T* __restrict__ r, int64_t L,
    const acc_type<T>* __restrict__ scale, const acc_type<T>* __restrict__ shift,
    MaskWord* __restrict__ mask, const Fn& act) {
  using V = VecT<T>;
  using A = typename V::acc_t;
  using AV = typename V::AV;
  constexpr int64_t K = V::kStep;
  constexpr int64_t P = V::kParts;
  constexpr int64_t H = AV::size();
  static_assert(!kMask || H == 8, "mask bytes hold the 8 lanes of a float vector");
  static_assert(!kMask || Fn::kReadsOut, "only a piecewise-linear activation keeps a mask");
  auto scalar = [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const A s = kPerPos ? scale[j] : scale[0];
      const A b = kPerPos ? shift[j] : shift[0];
      A z = std::fma(static_cast<A>(x[j]), s, b);
      if constexpr (kRes) {
        z += static_cast<A>(r[j]);
      }
      y[j] = static_cast<T>(act.forward(z));
    }
    if constexpr (kMask) {
      set_mask_bits(mask, y, j0, j1, act);
    }
  };
  // stores the vector at j, and records the mask of out as stored (in T), as bn_act_bwd would
  // read it from out
  auto store = [&](int64_t j0, const AV (&v)[P]) {
    if (stream) {
      V::store_nt(y + j0, v);
    } else {
      V::store(y + j0, v);
    }
    if constexpr (kMask) {
      AV stored[P];
      V::round(v, stored);
      FR_UNROLL
      for (int64_t q = 0; q < P; ++q) {
        mask[(j0 + q * H) / 8] = lane_bits(act.off(stored[q]));
      }
    }
  };
  int64_t j = std::min(head, L);
  scalar(0, j);
  for (; j + 2 * K <= L; j += 2 * K) {  // two vectors at a time: both loads in flight
    AV a[P], b[P], ra[P], rb[P], ya[P], yb[P];
    V::load(x + j, a);
    V::load(x + j + K, b);
    if constexpr (kRes) {
      V::load(r + j, ra);
      V::load(r + j + K, rb);
    }
    fwd_apply_vector<T, Fn, kRes, kPerPos>(a, ra, j, scale, shift, act, ya);
    fwd_apply_vector<T, Fn, kRes, kPerPos>(b, rb, j + K, scale, shift, act, yb);
    store(j, ya);
    store(j + K, yb);
  }
  for (; j + K <= L; j += K) {
    AV a[P], ra[P], ya[P];
    V::load(x + j, a);
    if constexpr (kRes) {
      V::load(r + j, ra);
    }
    fwd_apply_vector<T, Fn, kRes, kPerPos>(a, ra, j, scale, shift, act, ya);
    store(j, ya);
  }
  scalar(j, L);
}

// Apply: y = act(x·scale + shift (+ r)) over a span. Streaming stores (stream: a run-time choice,
// use_streaming_stores; a branch per vector store that the predictor always gets right, where a
// template flag compiled every apply kernel twice) need y aligned for stream_vec after a scalar
// head; a span with no such head, or whose head would shift the vectors off the mask bytes
// (kMask), takes plain stores.
template <typename T, typename Fn, bool kRes, bool kPerPos, bool kMask = false>
C10_ALWAYS_INLINE void fwd_apply_span(
    bool stream, T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ r, int64_t L,
    const acc_type<T>* __restrict__ scale, const acc_type<T>* __restrict__ shift, const Fn& act,
    MaskWord* __restrict__ mask = nullptr) {
  int64_t head = 0;
  if (stream) {
    head = stream_head(y);
    stream = head >= 0 && !(kMask && head != 0);
    head = stream ? head : 0;
  }
  fwd_apply_span_from<T, Fn, kRes, kPerPos, kMask>(
      stream, head, y, x, r, L, scale, shift, mask, act);
}

// Rows layout: apply to `nrows` consecutive super-rows of width W (per-position params of W).
// With a mask (kMask), W is a multiple of 8 and mask points at the bits of y[0].
template <typename T, typename Fn, bool kRes, bool kMask = false>
void fwd_apply_rows(
    bool stream, T* y, const T* x, const T* r, int64_t nrows, int64_t W, const acc_type<T>* scale,
    const acc_type<T>* shift, const Fn& act, MaskWord* mask = nullptr) {
  for (int64_t i = 0; i < nrows; ++i) {
    const int64_t o = i * W;
    fwd_apply_span<T, Fn, kRes, true, kMask>(
        stream, y + o, x + o, kRes ? r + o : nullptr, W, scale, shift, act,
        kMask ? mask + o / 8 : nullptr);
  }
}

// Rows layout: apply to chunk p's super-rows (and, for the last chunk, the leftover rows) with
// per-position scale/shift of width W. kMask: with the mask bits of all of them (W % 8 == 0, so
// the chunk and the leftover rows start on a mask byte).
template <typename T, typename Fn, bool kRes, bool kMask>
void fwd_apply_chunk(
    bool stream, const RowPlan& plan, int64_t p, T* y, const T* x, const T* r,
    const acc_type<T>* scale, const acc_type<T>* shift, const Fn& act, MaskWord* mask) {
  const int64_t g0 = plan.chunk_begin(p), g1 = plan.chunk_end(p);
  const int64_t o = g0 * plan.W;
  fwd_apply_rows<T, Fn, kRes, kMask>(
      stream, y + o, x + o, kRes ? r + o : nullptr, g1 - g0, plan.W, scale, shift, act,
      kMask ? mask + o / 8 : nullptr);
  if (p == plan.P - 1 && plan.Rl > 0) {
    const int64_t ol = plan.G * plan.W;
    fwd_apply_span<T, Fn, kRes, true, kMask>(
        stream, y + ol, x + ol, kRes ? r + ol : nullptr, plan.Rl * plan.C, scale, shift, act,
        kMask ? mask + ol / 8 : nullptr);
  }
}

} // namespace fused_resnet::cpu
