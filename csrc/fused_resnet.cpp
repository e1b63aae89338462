// Every op schema of fused_resnet, defined once. Backends register kernels for these schemas
// (csrc/cpu: CPU key, csrc/cuda: CUDA key); fused_resnet/ops.py registers the fake (meta) impls
// and the autograd formula of the functional ops in Python. The triton backend defines the same
// schemas in its own namespace (fused_resnet_triton). Every backend checks the arguments by the
// one op contract (csrc/common/contract.h, fused_resnet/contract.py).
//
// Notation, per channel c over the M = N * prod(spatial) elements of that channel:
//   mean_c = Σx / M,  var_c = Σ(x - mean_c)² / M  (biased),  invstd_c = 1 / sqrt(var_c + eps)
//   x̂ = (x - mean_c) * invstd_c,  z = x̂ * w_c + b_c (+ r),  y = act(z)
// act is an argument of every op that applies or differentiates it, last, with the
// ReLU as its default: relu, relu6, leaky_relu (negative_slope >= 0), identity, silu, hardswish,
// gelu, gelu_tanh (docs/design.md, "Activations", has each one's math and derivative).
// Statistics and parameter gradients are in the accumulation dtype: float64 for float64 inputs,
// float32 otherwise. Activations (out, grad_input, grad_residual) are in the input's dtype and keep
// the input's memory format.
//
// bn_act, the op a module call runs, updates the running statistics it is given in place (declared
// `Tensor(a!)`) in the statistics kernels' per-channel finalize, as ATen's native_batch_norm does;
// its autograd is in C++ (csrc/common/bn_act_autograd.cpp). The other ops are functional: none
// mutates its inputs.

#include <Python.h>
#include <torch/library.h>

#include <vector>

extern "C" {
// `import fused_resnet._C` loads this shared library, which runs the TORCH_LIBRARY registrations
// below. No Python functions are exported: everything is reached through torch.ops.fused_resnet.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fused_resnet kernels, reached through torch.ops.fused_resnet",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

// Every op takes any memory layout of its activations (contiguous NC*, channels_last, or
// anything else, made contiguous first) and lays its outputs out like the canonical input, as
// its fake impl says: torch.compile need not convert the layout around it (inductor keeps CPU
// convolutions channels_last, and would otherwise copy to NCHW and back at every BatchNorm).
const std::vector<at::Tag> kAnyLayout = {at::Tag::flexible_layout};

} // namespace

TORCH_LIBRARY(fused_resnet, m) {
  // One module call: act(batch_norm(input) (+ residual)).
  // training: normalizes with the batch statistics, returns them (save_mean, save_invstd) and
  //   the ReLU mask for the backward (as bn_act_fwd_train), and, when running_mean and
  //   running_var are given, updates them in place, in their own dtype, with the batch mean and
  //   the unbiased batch variance var·M/(M-1):
  //     running <- (1 - momentum) * running + momentum * batch
  //   (an empty batch leaves them as they are). M == 1 is refused, as nn.BatchNorm refuses it.
  // eval (training false): normalizes with running_mean and running_var (required), as
  //   bn_act_fwd_eval; save_mean, save_invstd and act_mask are empty.
  // Every argument is checked before anything is computed or changed.
  m.def(
      "bn_act(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias,"
      " Tensor(a!)? running_mean, Tensor(b!)? running_var, bool training, float momentum,"
      " float eps, str act=\"relu\", float negative_slope=0.01) -> (Tensor out, Tensor save_mean, Tensor save_invstd,"
      " Tensor act_mask)",
      kAnyLayout);

  // Training forward with batch statistics.
  // Returns (out, save_mean, save_invstd, batch_var, act_mask): batch_var is the biased
  // variance (the running estimate is unbiased by bn_act, or by SyncBatchNorm across processes).
  // An empty batch (M == 0) gives mean 0, var 0. act_mask is the ReLU mask kept for bn_act_bwd,
  // a uint8 vector in a form of the backend's own:
  //   CPU, an input in the rows layout (channels_last, or no spatial dimensions):
  //     ceil(numel / 8) bytes; bit e % 8 of byte e / 8 is set where out[e] <= 0, e the element's
  //     index in memory order. All zeros where the kernel keeps no mask (float64, a build
  //     without AVX2, or channel counts whose rows do not fill whole vectors).
  //   Otherwise: empty (bn_act_bwd reads out).
  m.def(
      "_bn_act_fwd_train(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps,"
      " str act=\"relu\", float negative_slope=0.01) -> (Tensor out, Tensor save_mean, Tensor save_invstd, Tensor batch_var,"
      " Tensor act_mask)",
      kAnyLayout);

  // Inference forward with the running statistics, folded per channel into
  //   scale = w / sqrt(running_var + eps),  shift = b - running_mean * scale,
  //   y = relu(x * scale + shift (+ r)).
  m.def(
      "_bn_act_fwd_eval(Tensor input, Tensor? residual, Tensor running_mean, Tensor running_var,"
      " Tensor? weight, Tensor? bias, float eps, str act=\"relu\", float negative_slope=0.01) -> Tensor",
      kAnyLayout);

  // Backward of both forwards. dz = grad_out · act'(z): for relu, relu6 and leaky_relu read from
  // out (relu: 0 where out <= 0, as aten's threshold_backward; relu6: 0 where out <= 0 or
  // out >= 6, as hardtanh_backward; leaky_relu: grad_out·negative_slope where out <= 0), for the
  // smooth activations from z recomputed from input, mean, invstd, weight, bias and residual (so
  // out may be None), dz = grad_out for identity; then
  //   grad_bias = Σdz,  grad_weight = Σdz·x̂,  grad_residual = dz,
  //   grad_input = w·invstd·(dz - Σdz/M - x̂·Σdz·x̂/M)   when batch_stats (training statistics)
  //   grad_input = w·invstd·dz                           otherwise (running statistics).
  // grad_residual is an empty tensor unless residual_grad. grad_weight and grad_bias are always
  // returned, in the accumulation dtype; the caller casts them to the parameter's dtype.
  // act_mask: bn_act_fwd_train's (the backward of the training forward), whose bits then stand
  // in for out where it has them; or an empty tensor (the backward of the eval forward).
  m.def(
      "_bn_act_bwd(Tensor grad_out, Tensor? out, Tensor act_mask, Tensor input, Tensor? weight,"
      " Tensor mean, Tensor invstd, bool batch_stats, bool residual_grad, Tensor? residual=None,"
      " Tensor? bias=None, str act=\"relu\", float negative_slope=0.01)"
      " -> (Tensor grad_input, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)",
      kAnyLayout);

  // The pieces of the training ops, for statistics that span several processes (SyncBatchNorm,
  // fused_resnet/nn/syncbn.py): local statistics, then a collective, then the apply pass. The
  // forward apply with the merged (global) batch statistics is bn_act_fwd_eval(input, residual,
  // global_mean, global_biased_var, weight, bias, eps).

  // Local per-channel batch statistics: mean and biased variance over this input's M elements
  // (Welford M2 = var·M). An empty input gives mean 0, var 0.
  m.def("_bn_stats(Tensor input) -> (Tensor mean, Tensor var)", kAnyLayout);

  // Local backward reductions, dz as in _bn_act_bwd:
  //   sum_dz_xhat = Σdz·x̂,  sum_dz = Σdz   (= grad_weight, grad_bias of this input alone).
  m.def(
      "_bn_act_bwd_reduce(Tensor grad_out, Tensor? out, Tensor input, Tensor mean, Tensor invstd,"
      " Tensor? residual=None, Tensor? weight=None, Tensor? bias=None, str act=\"relu\","
      " float negative_slope=0.01)"
      " -> (Tensor sum_dz_xhat, Tensor sum_dz)",
      kAnyLayout);

  // Backward apply with given (global) means of the reductions, Σ over all M_total elements:
  //   grad_input = w·invstd·(dz - mean_dz - x̂·mean_dz_xhat),  grad_residual = dz,
  //   mean_dz = Σdz / M_total,  mean_dz_xhat = Σdz·x̂ / M_total  (acc dtype, length C).
  // grad_residual is an empty tensor unless residual_grad.
  m.def(
      "_bn_act_bwd_apply(Tensor grad_out, Tensor? out, Tensor input, Tensor? weight, Tensor mean,"
      " Tensor invstd, Tensor mean_dz, Tensor mean_dz_xhat, bool residual_grad,"
      " Tensor? residual=None, Tensor? bias=None, str act=\"relu\", float negative_slope=0.01)"
      " -> (Tensor grad_input, Tensor grad_residual)",
      kAnyLayout);
}
