"""Compile every Triton kernel of fused_resnet for an NVIDIA GPU target, without a GPU.

    TRITON_INTERPRET=0 python tests/compile_triton_kernels.py [ARCH ...]   (default: 80 90)

The interpreter that runs the kernels in the CPU test suite is lenient where the compiler is not
(types of loop-carried values, integer arguments equal to 1 that the JIT turns into constants), so
test_triton.py runs this in a subprocess: each kernel in both views (NC* and channels_last), its
constexpr flags all off and all on, bfloat16 and float64 activations, with the arguments the JIT
specializes to the constant 1 (unit strides, a single split) given as constants, as a launch would;
then every other tile the GPU rule can pick (fused_resnet/triton/tiles.py), flags all on, bfloat16.
Compiling goes down to a cubin with the ptxas that ships with triton. The last line says how many
variants compiled and the mean seconds each took (the compile time a GPU run pays per
specialization, benchmarks/NOTES.md).
"""

import os
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_resnet.triton import kernels, tiles

# Pointer arguments in the accumulation dtype; every other pointer is an activation (or a
# parameter, which may be in the activation dtype).
ACC_POINTERS = {
    "mean_part_ptr", "m2_part_ptr", "mean_ptr", "var_ptr", "invstd_ptr", "sum_dz_part_ptr",
    "sum_dz_xmu_part_ptr", "sum_dz_ptr", "sum_dz_xhat_ptr",
    "running_mean_ptr", "running_var_ptr",  # float32 running statistics beside bfloat16 (AMP)
}
FLOAT_BITS_ARGUMENTS = {"eps_bits", "momentum_bits", "slope_bits"}  # a float64's bits: int64
# (first tile of the view, arguments equal to 1 in that view)
VIEWS = {
    "ncs": (tiles.PLANE_TILES[0], ("stride_xb", "stride_rb", "stride_dyb", "stride_ob")),
    "channels_last": (tiles.ROW_TILES[0], ("stride_xc", "stride_rc", "stride_dyc", "stride_oc", "n_inner")),
}
FLAGS = {
    "_bn_fwd_stats_kernel": ("SINGLE_SPLIT", "UPDATE_RUNNING"),
    "_bn_act_bwd_reduce_kernel": ("SINGLE_SPLIT", "RECOMPUTE_Z", "HAS_WEIGHT", "HAS_BIAS", "HAS_RESIDUAL"),
    "_bn_act_fwd_apply_kernel": ("BATCH_STATS", "HAS_WEIGHT", "HAS_BIAS", "HAS_RESIDUAL"),
    "_bn_act_bwd_apply_kernel": (
        "BATCH_STATS", "HAS_WEIGHT", "WRITE_GRAD_RESIDUAL", "RECOMPUTE_Z", "HAS_BIAS", "HAS_RESIDUAL",
    ),
}
# The kernels that apply or differentiate the activation (the ACT constexpr, kernels.ACT_*); with
# the flags all off they compile relu, all on silu, then every activation once (below).
ACT_KERNELS = ("_bn_act_fwd_apply_kernel", "_bn_act_bwd_reduce_kernel", "_bn_act_bwd_apply_kernel")
RELU, SILU, N_ACTIVATIONS = 0, 4, 8
# (kernel, its flags)
COMBINE_KERNELS = (("_bn_fwd_stats_combine_kernel", ("UPDATE_RUNNING",)), ("_bn_act_bwd_reduce_combine_kernel", ()))


def compile_kernel(fn, target, activation, acc, constexprs, ones=(), num_warps=4):
    unspecialized = set(kernels._UNSPECIALIZED)
    constants = dict(constexprs, **{n: 1 for n in ones if n in fn.arg_names and n not in unspecialized})
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + (acc if name in ACC_POINTERS else activation)
        elif name in FLOAT_BITS_ARGUMENTS:
            signature[name] = "i64"
        else:
            signature[name] = "i32"
    triton.compile(ASTSource(fn, signature, constexprs=constants), target=target, options={"num_warps": num_warps})


def _tile_constexprs(tile):
    return dict(BLOCK_A=tile.block_a, BLOCK_C=tile.block_c, BLOCK_B=tile.block_b)


def compile_all(arch: int, dtypes=(("bf16", "fp32"), ("fp64", "fp64"))) -> int:
    """Each kernel with all its flags off and all on (every branch compiles), per view and dtype;
    float32 activations take the bfloat16 path minus the conversions. Then the other GPU tiles."""
    target = GPUTarget("cuda", arch, 32)
    compiled = 0
    for activation, acc in dtypes:
        for tile, ones in VIEWS.values():
            for name, flags in FLAGS.items():
                for value, extra_ones in ((False, ("n_outer",)), (True, ("splits_b", "count"))):
                    constexprs = dict(_tile_constexprs(tile), **{flag: value for flag in flags})
                    if name in ACT_KERNELS:
                        constexprs["ACT"] = SILU if value else RELU
                    compile_kernel(getattr(kernels, name), target, activation, acc, constexprs,
                                   ones + extra_ones, tile.num_warps)
                    compiled += 1
        for name, flags in COMBINE_KERNELS:
            for value, ones in ((False, ("n_outer",)), (True, ("n_inner", "splits_b", "chunk_b"))):
                constexprs = dict(BLOCK_S=16, BLOCK_C=64, **{flag: value for flag in flags})
                compile_kernel(getattr(kernels, name), target, activation, acc, constexprs, ones)
                compiled += 1
    # every activation's branch, in each dtype (float64's exact constants), the planes view
    tile, ones = VIEWS["ncs"]
    for activation, acc in dtypes:
        for name in ACT_KERNELS:
            for act in range(N_ACTIVATIONS):
                if act in (RELU, SILU):
                    continue  # compiled above
                constexprs = dict(_tile_constexprs(tile), **{flag: True for flag in FLAGS[name]}, ACT=act)
                compile_kernel(getattr(kernels, name), target, activation, acc, constexprs, ones, tile.num_warps)
                compiled += 1
    first_tiles = {tile for tile, _ in VIEWS.values()}
    for tile in tiles.GPU_TILES:
        if tile in first_tiles:
            continue
        ones = VIEWS["channels_last" if tile.block_b == 1 else "ncs"][1]
        for name, flags in FLAGS.items():
            constexprs = dict(_tile_constexprs(tile), **{flag: True for flag in flags})
            if name in ACT_KERNELS:
                constexprs["ACT"] = SILU
            compile_kernel(getattr(kernels, name), target, "bf16", "fp32", constexprs, ones, tile.num_warps)
            compiled += 1
    return compiled


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0: the interpreter replaces the compiler")
    for arch in [int(a) for a in sys.argv[1:]] or [80, 90]:
        start = time.perf_counter()
        count = compile_all(arch)
        seconds = time.perf_counter() - start
        print(f"sm_{arch}: compiled {count} kernel variants in {seconds:.1f} s ({seconds / count:.2f} s each)")
