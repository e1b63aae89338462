// nn.BatchNorm's running-statistics update, as the training forward's per-channel finalize
// applies it (CPU: cpu/fwd.cpp's finalize_stats; CUDA: the statistics kernel's finalize),
// so that bn_act needs no op of its own for it, as ATen's native_batch_norm:
//
//   running_mean[c] <- (1 - momentum)·running_mean[c] + momentum·mean[c]
//   running_var[c]  <- (1 - momentum)·running_var[c]  + momentum·var[c]·M/(M - 1)
//
// with var the biased batch variance over the channel's M values. Computed in the accumulation
// dtype A, stored in the buffer's own dtype: A, or the input's T (a float16 buffer beside a
// float16 input). An empty batch (M == 0) never reaches a finalize, and leaves the buffers as
// they are.
//
// Device code includes this header: no ATen here (device_ops.h builds the update).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace fused_resnet {

template <typename A>
struct RunningStatsUpdate {
  void* mean = nullptr;  // null: no running statistics to update
  void* var = nullptr;
  int64_t mean_stride = 1;
  int64_t var_stride = 1;
  bool mean_is_acc = true;  // the buffer's dtype: A (true) or the input's T (false)
  bool var_is_acc = true;
  A keep = 0;       // 1 - momentum
  A take_mean = 0;  // momentum
  A take_var = 0;   // momentum·M/(M - 1)

  // Applies the update to channel c. T is the input's dtype.
  template <typename T>
  C10_HOST_DEVICE void apply(int64_t c, A batch_mean, A batch_var) const {
    if (mean == nullptr) {
      return;
    }
    blend<T>(mean, mean_stride, mean_is_acc, c, batch_mean, take_mean);
    blend<T>(var, var_stride, var_is_acc, c, batch_var, take_var);
  }

 private:
  template <typename T>
  C10_HOST_DEVICE void blend(
      void* buffer, int64_t stride, bool is_acc, int64_t c, A batch, A take) const {
    if (is_acc) {
      A& r = static_cast<A*>(buffer)[c * stride];
      r = r * keep + batch * take;
    } else {
      T& r = static_cast<T*>(buffer)[c * stride];
      r = static_cast<T>(static_cast<A>(r) * keep + batch * take);
    }
  }
};

} // namespace fused_resnet
