// Host-side checks and layout selection shared by the CPU kernels.
#include "bn_act_cpu.h"

#include <ATen/ops/empty_like.h>

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fused_resnet::cpu {

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

} // namespace

Geometry canonicalize_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.defined(), op, ": input is undefined");
  TORCH_CHECK(
      at::isFloatingType(input.scalar_type()),
      op, ": expected a floating-point input, got ", input.scalar_type());
  TORCH_CHECK(
      supported_dtype(input.scalar_type()),
      op, ": unsupported input dtype ", input.scalar_type(),
      " (expected Float, Double, Half or BFloat16)");
  TORCH_CHECK(
      input.dim() >= 2,
      op, ": expected an input of at least 2 dimensions (N, C, *), got ", input.dim(),
      "D input of shape ", input.sizes());
  TORCH_CHECK(input.device().is_cpu(), op, ": expected a CPU input, got ", input.device());

  Geometry g;
  g.N = input.size(0);
  g.C = input.size(1);
  g.S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) {
    g.S *= input.size(d);
  }

  if (input.is_contiguous()) {
    g.x = input;
    g.format = at::MemoryFormat::Contiguous;
  } else if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    g.x = input;
    g.format = at::MemoryFormat::ChannelsLast;
  } else if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    g.x = input;
    g.format = at::MemoryFormat::ChannelsLast3d;
  } else {
    // Sliced, transposed, expanded...: one copy to contiguous NC* (the layout the fake impls in
    // fused_resnet/ops.py promise for such inputs).
    g.format = at::MemoryFormat::Contiguous;
    g.x = input.contiguous();
  }
  g.rows = g.format != at::MemoryFormat::Contiguous || g.S == 1;
  return g;
}

at::Tensor activation_like_input(
    const at::Tensor& t, const at::Tensor& input, const Geometry& g, const char* name,
    const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(
      t.sizes() == input.sizes(),
      op, ": ", name, " shape ", t.sizes(), " does not match input shape ", input.sizes());
  TORCH_CHECK(
      t.scalar_type() == input.scalar_type(),
      op, ": ", name, " dtype ", t.scalar_type(), " does not match input dtype ",
      input.scalar_type());
  TORCH_CHECK(
      t.device() == input.device(),
      op, ": ", name, " is on ", t.device(), " but input is on ", input.device());
  // A no-op when t already has that layout (size-1 dims do not matter for the addressing).
  return t.contiguous(g.format);
}

namespace {

// Large outputs are fresh memory that the kernel touches once, so first-touch page faults are a
// large part of their cost (glibc returns big freed blocks to the OS and maps them again, one
// 4 KiB fault per page, ~1-2 µs each in a VM: ~10 ms for a 25 MB output, more than the kernel
// itself). Advising transparent huge pages on the 2 MiB-aligned interior cuts the faults by 512x
// (the same as PyTorch's opt-in THP_MEM_ALLOC_ENABLE, applied to these outputs only). A no-op
// where THP is disabled; FUSED_RESNET_THP=0 turns it off.
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

at::Tensor empty_activation(const Geometry& g) {
  // g.x is dense and non-overlapping, so Preserve gives exactly its strides.
  at::Tensor t = at::empty_like(g.x, at::MemoryFormat::Preserve);
  advise_huge_pages(t);
  return t;
}

bool use_streaming_stores(int64_t bytes) {
  // Default: 40 MiB of activations touched by the op. Measured on the 2-core EPYC VM this was
  // tuned on, with the benchmark's warm inputs: plain stores win up to ~39 MB touched (eval of
  // (2,64,8,56,56) with a residual), streaming wins from ~51 MB ((8,256,56,56) eval) up.
  // sysconf(_SC_LEVEL3_CACHE_SIZE) is not used: in VMs it reports the whole host's L3.
  static const int64_t threshold = [] {
    if (const char* env = std::getenv("FUSED_RESNET_STREAM_MIN_BYTES")) {
      return static_cast<int64_t>(std::atoll(env));  // < 0: never stream
    }
    return int64_t(40) << 20;
  }();
  return FR_HAVE_STREAM && threshold >= 0 && bytes > threshold;
}

void check_param(
    const at::Tensor& t, const at::Tensor& input, int64_t C, const char* name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(
      t.dim() == 1 && t.size(0) == C,
      op, ": expected ", name, " to be a 1-D tensor with one entry per channel (", C,
      "), got shape ", t.sizes());
  const auto dt = t.scalar_type();
  const auto in = input.scalar_type();
  if (in == at::kFloat) {
    TORCH_CHECK(
        dt == at::kFloat,
        op, ": ", name, " dtype ", dt, " is not allowed for a Float input (expected Float)");
  } else {
    TORCH_CHECK(
        dt == in || dt == at::kFloat,
        op, ": ", name, " dtype ", dt, " is not allowed for a ", in, " input (expected ", in,
        " or Float)");
  }
  TORCH_CHECK(
      t.device() == input.device(),
      op, ": ", name, " is on ", t.device(), " but input is on ", input.device());
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
