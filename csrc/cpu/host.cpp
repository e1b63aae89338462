// Host-side helpers of the CPU kernels: outputs, streaming-store policy, parameter reads.
// (The input checks shared with the CUDA backend are in csrc/common/contract.cpp.)
#include "host.h"
#include "vec.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fused_resnet::cpu {

namespace {

// Large outputs are fresh memory that the kernel touches once, so first-touch page faults are a
// large part of their cost (glibc returns big freed blocks to the OS and maps them again, one
// 4 KiB fault per page, each costing microseconds, more than the kernel's work on that page).
// Advising transparent huge pages on the 2 MiB-aligned interior cuts the faults by 512x (the
// same as PyTorch's opt-in THP_MEM_ALLOC_ENABLE, applied to these outputs only). A no-op where
// THP is disabled; FUSED_RESNET_THP=0 turns it off.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* env = std::getenv("FUSED_RESNET_THP");
    return env == nullptr || std::atoi(env) != 0;
  }();
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  // At least one whole huge page inside the buffer, whatever its alignment.
  constexpr size_t kMinBytes = size_t(4) << 20;
  if (!enabled || t.nbytes() < kMinBytes) {
    return;
  }
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (p + t.nbytes()) & ~(kHuge - 1);
  if (hi > lo) {
    // advisory only: failure (e.g. EINVAL without THP support) changes nothing
    (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#else
  (void)t;
#endif
}

} // namespace

at::Tensor empty_activation(const View& g) {
  // g.x is dense and non-overlapping, so Preserve gives exactly its strides.
  at::Tensor t = at::empty_like(g.x, at::MemoryFormat::Preserve);
  advise_huge_pages(t);
  return t;
}

bool use_streaming_stores(int64_t bytes, Pass passes) {
  // Streaming stores skip the destination's read-for-ownership and keep the output from evicting
  // the inputs from the last-level cache; plain stores leave the output in cache for the next
  // layer.
  //  * One pass (eval): plain stores win while everything stays in cache, as it does for an
  //    input the previous layer has just written and an output the next layer reads at once;
  //    streaming only once the op's data would not stay there anyway. Threshold 40 MiB.
  //  * Two passes (training forward and backward): the second pass re-reads the inputs, and
  //    the outputs are written once and never read back by the op (the backward takes the
  //    activation's mask, or recomputes z, rather than read out): streaming them keeps the
  //    inputs in cache for the second pass.
  //    Threshold 8 MiB.
  // The thresholds come from A/B runs on a 2-core CPU VM (benchmarks/NOTES.md, "CPU kernel tuning").
  // FUSED_RESNET_STREAM_MIN_BYTES sets both thresholds (< 0: never stream).
  // (Not sysconf(_SC_LEVEL3_CACHE_SIZE): in VMs it reports the whole host's L3.)
  static const int64_t env_threshold = [] {
    const char* env = std::getenv("FUSED_RESNET_STREAM_MIN_BYTES");
    return env != nullptr ? static_cast<int64_t>(std::atoll(env)) : int64_t(-2);
  }();
  const int64_t threshold = env_threshold != -2 ? env_threshold
      : passes == Pass::kTwo                    ? int64_t(8) << 20
                                                : int64_t(40) << 20;
  return FR_HAVE_STREAM && threshold >= 0 && bytes > threshold;
}

template <typename acc_t>
void read_param(const std::optional<at::Tensor>& t, int64_t C, acc_t fill, acc_t* dst) {
  if (!t.has_value() || !t->defined()) {
    std::fill(dst, dst + C, fill);
    return;
  }
  const int64_t st = t->stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, t->scalar_type(), "fused_resnet_read_param", [&] {
        const scalar_t* p = t->const_data_ptr<scalar_t>();
        for (int64_t c = 0; c < C; ++c) {
          dst[c] = static_cast<acc_t>(p[c * st]);
        }
      });
}

template void read_param<float>(const std::optional<at::Tensor>&, int64_t, float, float*);
template void read_param<double>(const std::optional<at::Tensor>&, int64_t, double, double*);

} // namespace fused_resnet::cpu
