"""Builds fused_resnet._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA.

Environment:
  FUSED_RESNET_FORCE_CUDA=1   build the CUDA sources even if no CUDA torch/nvcc is detected
  FUSED_RESNET_NO_CUDA=1      never build the CUDA sources
  FUSED_RESNET_CPU_FLAGS      extra compiler flags for the CPU kernels, replacing the detected
                              ISA flags (e.g. "" for a portable build, "-march=native")
  MAX_JOBS                    parallel compile jobs (torch.utils.cpp_extension)
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

try:
    from torch.utils import cpp_extension
except ImportError as error:  # an isolated build env, or no torch installed
    raise SystemExit(
        "fused_resnet builds against the installed torch: install torch first, then build with "
        "`pip install --no-build-isolation -e .`"
    ) from error

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _flag("FUSED_RESNET_NO_CUDA"):
        return False
    if _flag("FUSED_RESNET_FORCE_CUDA"):
        return True
    import torch

    has_nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    return torch.version.cuda is not None and has_nvcc


def _cpu_isa_flags():
    """AVX2+FMA for at::vec when the build machine has them (the extension is built where it runs).

    at::vec::Vectorized picks its implementation from CPU_CAPABILITY_* macros; without them it
    falls back to a scalar loop the compiler may or may not vectorize.
    """
    if "FUSED_RESNET_CPU_FLAGS" in os.environ:
        return os.environ["FUSED_RESNET_CPU_FLAGS"].split()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if "avx2" in flags and "fma" in flags:
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return []


def _extensions():
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"] + _cpu_isa_flags()
    sources = [os.path.join("csrc", "fused_resnet.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "common", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # csrc/cuda: the kernels (.cu, nvcc) and their host ops (.cpp, compiled once by the host
    # compiler with the CUDA headers).
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    cuda_sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda() and cuda_sources:
        arch_flags = []
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            arch_flags = [
                "-gencode=arch=compute_80,code=sm_80",
                "-gencode=arch=compute_90,code=sm_90",
                "-gencode=arch=compute_90,code=compute_90",
            ]
        # No -std: torch.utils.cpp_extension adds the standard its own headers need (C++20 in
        # torch 2.13); the sources themselves are C++17.
        nvcc_flags = ["-O3", "-lineinfo", "--threads", str(os.cpu_count() or 1)]
        nvcc_flags += ["--expt-relaxed-constexpr"] + arch_flags
        return [
            cpp_extension.CUDAExtension(
                "fused_resnet._C",
                sources + cuda_sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        cpp_extension.CppExtension(
            "fused_resnet._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    name="fused_resnet",
    version="0.1.0",
    description="Fused BatchNorm(+add)+ReLU kernels and ResNet blocks for PyTorch",
    packages=find_packages(include=["fused_resnet", "fused_resnet.*"]),
    python_requires=">=3.9",
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
