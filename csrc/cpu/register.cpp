// The CPU kernels of the fused_resnet ops (schemas in csrc/fused_resnet.cpp), registered through
// the op contract (common/device_ops.h).
#include <torch/library.h>

#include "host.h"
#include "act_mask.h"

namespace fused_resnet::cpu {

const DeviceOps kCpuOps{
    .fwd_train = fwd_train_cpu,
    .fwd_eval = fwd_eval_cpu,
    .bwd = bwd_cpu,
    .stats = stats_cpu,
    .bwd_reduce = bwd_reduce_cpu,
    .bwd_apply = bwd_apply_cpu,
    .act_mask_bytes = cpu_act_mask_bytes,
};

} // namespace fused_resnet::cpu

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  fused_resnet::register_device_ops<fused_resnet::cpu::kCpuOps>(m);
}
