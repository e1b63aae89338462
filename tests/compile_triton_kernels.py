"""Compile every Triton kernel of fused_resnet for an NVIDIA GPU target, without a GPU.

    TRITON_INTERPRET=0 python tests/compile_triton_kernels.py [ARCH ...]   (default: 80 90)

The interpreter that runs the kernels in the CPU test suite is lenient where the compiler is not
(types of loop-carried values, integer arguments equal to 1 that the JIT turns into constants), so
test_triton.py runs this in a subprocess: each kernel in both views (NC* and channels_last), its
constexpr flags all off and all on, bfloat16 and float64 activations, with the arguments the JIT specializes
to the constant 1 (unit strides, a single split) given as constants, as a launch would.
Compiling goes down to a cubin with the ptxas that ships with triton.
"""

import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_resnet.triton import kernels

# Pointer arguments in the accumulation dtype; every other pointer is an activation (or a
# parameter, which may be in the activation dtype).
ACC_POINTERS = {
    "mean_part_ptr", "m2_part_ptr", "mean_ptr", "var_ptr", "invstd_ptr", "dz_part_ptr",
    "dzx_part_ptr", "sum_dz_ptr", "sum_dz_xhat_ptr", "dz_stat_ptr", "dzx_stat_ptr",
    "running_mean_ptr", "running_var_ptr",  # float32 running statistics beside bfloat16 (AMP)
}
FLOAT_ARGUMENTS = {"eps", "momentum_hi", "momentum_lo"}
# (tile, arguments equal to 1 in that view)
VIEWS = {
    "ncs": (dict(BLOCK_A=2, BLOCK_C=1, BLOCK_B=512), ("stride_xb", "stride_rb", "stride_dyb", "stride_ob")),
    "channels_last": (
        dict(BLOCK_A=64, BLOCK_C=32, BLOCK_B=1),
        ("stride_xc", "stride_rc", "stride_dyc", "stride_oc", "n_inner"),
    ),
}
FLAGS = {
    "_bn_fwd_stats_kernel": ("SINGLE_SPLIT", "UPDATE_RUNNING"),
    "_bn_act_bwd_reduce_kernel": ("SINGLE_SPLIT",),
    "_bn_act_fwd_apply_kernel": ("SPREAD_IS_VAR", "HAS_WEIGHT", "HAS_BIAS", "HAS_RESIDUAL"),
    "_bn_act_bwd_apply_kernel": ("BATCH_STATS", "HAS_WEIGHT", "WRITE_GRAD_RESIDUAL"),
}
# (kernel, its flags)
COMBINE_KERNELS = (("_bn_fwd_stats_combine_kernel", ("UPDATE_RUNNING",)), ("_bn_act_bwd_reduce_combine_kernel", ()))


def _jit_function(kernel):
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # through triton.autotune
    return kernel


def compile_kernel(kernel, target, activation, acc, constexprs, ones=()):
    fn = _jit_function(kernel)
    constants = dict(constexprs, **{name: 1 for name in ones if name in fn.arg_names})
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (acc if name in ACC_POINTERS else activation)
        elif name in FLOAT_ARGUMENTS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    triton.compile(ASTSource(fn, signature, constexprs=constants), target=target)


def compile_all(arch: int, dtypes=(("bf16", "fp32"), ("fp64", "fp64"))) -> int:
    """Each kernel with all its flags off and all on (every branch compiles), per view and dtype;
    float32 activations take the bfloat16 path minus the conversions."""
    target = GPUTarget("cuda", arch, 32)
    compiled = 0
    for activation, acc in dtypes:
        for tile, ones in VIEWS.values():
            for name, flags in FLAGS.items():
                for value, extra_ones in ((False, ("n_outer",)), (True, ("splits_b", "count"))):
                    constexprs = dict(tile, **{flag: value for flag in flags})
                    compile_kernel(getattr(kernels, name), target, activation, acc, constexprs, ones + extra_ones)
                    compiled += 1
        for name, flags in COMBINE_KERNELS:
            for value, ones in ((False, ("n_outer",)), (True, ("n_inner", "splits_b", "chunk_b"))):
                constexprs = dict(BLOCK_S=16, BLOCK_C=64, **{flag: value for flag in flags})
                compile_kernel(getattr(kernels, name), target, activation, acc, constexprs, ones)
                compiled += 1
    return compiled


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0: the interpreter replaces the compiler")
    for arch in [int(a) for a in sys.argv[1:]] or [80, 90]:
        print(f"sm_{arch}: compiled {compile_all(arch)} kernel variants")
