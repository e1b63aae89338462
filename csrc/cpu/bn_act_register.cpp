// CPU kernels of the fused_resnet ops (schemas in csrc/fused_resnet.cpp).
#include <torch/library.h>

#include "bn_act_cpu.h"

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("bn_act", TORCH_FN(fused_resnet::cpu::bn_act_cpu));
  m.impl("bn_act_fwd_train", TORCH_FN(fused_resnet::cpu::bn_act_fwd_train_cpu));
  m.impl("bn_act_fwd_eval", TORCH_FN(fused_resnet::cpu::bn_act_fwd_eval_cpu));
  m.impl("bn_act_bwd", TORCH_FN(fused_resnet::cpu::bn_act_bwd_cpu));
  m.impl("bn_stats", TORCH_FN(fused_resnet::cpu::bn_stats_cpu));
  m.impl("bn_act_bwd_reduce", TORCH_FN(fused_resnet::cpu::bn_act_bwd_reduce_cpu));
  m.impl("bn_act_bwd_apply", TORCH_FN(fused_resnet::cpu::bn_act_bwd_apply_cpu));
}
