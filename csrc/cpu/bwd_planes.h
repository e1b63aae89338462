// The backward over the planes layout [N][C][S]: the reduce and apply passes over the tasks of
// PlaneTasks (plans.h), the activation Fn and the residual flag kRes of dz as in bwd_spans.h.
#pragma once

#include <ATen/Parallel.h>

#include "bwd_spans.h"
#include "plans.h"

#include <vector>

namespace fused_resnet::cpu {

// ------------------------------------------------------------------------------------------
// Planes layout (tasks: PlaneTasks in plans.h).

template <typename T, typename Fn, bool kRes>
Sums task_sums(const BwdArgs<T>& a, const PlaneTasks& tasks, int64_t t, const Fn& act) {
  Sums s;
  const int64_t c = tasks.channel(t);
  tasks.for_each_span(t, [&](int64_t o, int64_t len) {
    reduce_span<T, Fn, kRes>(
        a.dy + o, at_offset(a.y, o), a.x + o, at_offset(a.r, o), len, a.mean[c], a.zscale[c],
        a.zshift[c], act, s);
  });
  return s;
}

template <typename T, typename Fn, bool kRes, typename F>
C10_ALWAYS_INLINE void apply_task(
    const BwdArgs<T>& a, const PlaneTasks& tasks, int64_t t, const Coef<acc_type<T>>& k,
    const Fn& act) {
  const int64_t c = tasks.channel(t);
  tasks.for_each_span(t, [&](int64_t o, int64_t len) {
    apply_span<T, Fn, kRes, F, false>(
        a.stream, a.dx + o, F::kResGrad ? a.dr + o : nullptr, a.dy + o, at_offset(a.y, o), a.x + o,
        at_offset(a.r, o), len, &k.a, &k.b, a.mean + c, &k.d, a.zshift + c, act);
  });
}

// Per-channel sums: the tasks in parallel, then each channel's parts added in order.
template <typename T, typename Fn, bool kRes>
void planes_sums(const BwdArgs<T>& a, const PlaneTasks& tasks, Sums* out, const Fn& act) {
  std::vector<Sums> part(tasks.count());
  at::parallel_for(0, tasks.count(), tasks.grain(), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      part[t] = task_sums<T, Fn, kRes>(a, tasks, t, act);
    }
  });
  for (int64_t c = 0; c < tasks.C; ++c) {
    Sums s;
    for (int64_t p = 0; p < tasks.P; ++p) {
      s.sum_dz += part[c * tasks.P + p].sum_dz;
      s.sum_dz_xmu += part[c * tasks.P + p].sum_dz_xmu;
    }
    out[c] = s;
  }
}

template <typename T, typename Fn, bool kRes, typename F>
void planes_apply(
    const BwdArgs<T>& a, const PlaneTasks& tasks, const Coef<acc_type<T>>* coef, const Fn& act) {
  at::parallel_for(0, tasks.count(), tasks.grain(), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      apply_task<T, Fn, kRes, F>(a, tasks, t, coef[tasks.channel(t)], act);
    }
    if (a.stream) {
      stream_fence();
    }
  });
}

} // namespace fused_resnet::cpu
