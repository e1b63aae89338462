// The backward over the planes layout [N][C][S]: the reduce and apply passes over the tasks of
// PlaneTasks (plans.h).
#pragma once

#include <ATen/Parallel.h>

#include "bwd_spans.h"
#include "plans.h"

#include <vector>

namespace fused_resnet::cpu {

// ------------------------------------------------------------------------------------------
// Planes layout (tasks: PlaneTasks in plans.h).

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
      s.sum_dz += part[c * tasks.P + p].sum_dz;
      s.sum_dz_xmu += part[c * tasks.P + p].sum_dz_xmu;
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

} // namespace fused_resnet::cpu
