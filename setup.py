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
import re
import shutil
import subprocess

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


def _has_cuda_headers(home):
    return home is not None and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h"))


def _toolkit_of_nvcc():
    """The CUDA toolkit the `nvcc` on PATH really runs, from `nvcc --dryrun`'s `TOP=` line.

    torch guesses CUDA_HOME as the folder above `nvcc`'s, which is wrong when `nvcc` is a wrapper
    script (say /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc): the host-compiled
    sources then miss cuda_runtime_api.h. nvcc itself knows where its toolkit lies.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        dryrun = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def _cuda_home():
    """torch's CUDA_HOME when it holds the CUDA headers, else the toolkit of the real `nvcc`.

    The choice is written back into torch.utils.cpp_extension (and the environment, for the
    compiler subprocesses), whose include paths and nvcc path are derived from it.
    """
    home = cpp_extension.CUDA_HOME
    if _has_cuda_headers(home):
        return home
    found = _toolkit_of_nvcc()
    if not _has_cuda_headers(found):
        return None
    cpp_extension.CUDA_HOME = found
    os.environ["CUDA_HOME"] = found
    return found


def _want_cuda():
    if _flag("FUSED_RESNET_NO_CUDA"):
        return False
    if _flag("FUSED_RESNET_FORCE_CUDA"):
        _cuda_home()
        return True
    import torch

    return torch.version.cuda is not None and _cuda_home() is not None


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


def _sources(*patterns):
    """Source files under ROOT matching the glob patterns, as relative paths (setuptools wants them)."""
    return sorted(os.path.relpath(f, ROOT) for p in patterns for f in glob.glob(os.path.join(ROOT, p)))


CPU_SOURCES = _sources("csrc/fused_resnet.cpp", "csrc/common/*.cpp", "csrc/cpu/*.cpp")
# csrc/cuda: the kernels (.cu, nvcc) and their host ops (.cpp, built by the host compiler with the
# CUDA headers).
CUDA_SOURCES = _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")


def extension(cuda, sources=None):
    """fused_resnet._C: the CPU sources, plus the CUDA ones when `cuda`. `sources` replaces the
    list with the same flags (tests/test_cuda_compile.py compiles the CUDA sources alone)."""
    # No -std: torch.utils.cpp_extension adds the C++ standard its own headers need (C++20 in
    # current releases); the sources compile under C++17 and C++20.
    # -g0: no debug information (Python's own flags ask for -g). The CPU kernels are compiled
    # once per dtype, activation, layout and flag; their debug information is 95% of the objects
    # (cpu/fwd.o: 140 MB with it, 6 MB without) and a third of the compile time.
    cxx_flags = ["-O3", "-g0", "-fopenmp"] + _cpu_isa_flags()
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not cuda:
        return cpp_extension.CppExtension(
            "fused_resnet._C",
            CPU_SOURCES if sources is None else sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    arch_flags = []
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        arch_flags = [
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90",
        ]
    nvcc_flags = ["-O3", "-lineinfo", "--threads", str(os.cpu_count() or 1)]
    nvcc_flags += ["--expt-relaxed-constexpr"] + arch_flags
    return cpp_extension.CUDAExtension(
        "fused_resnet._C",
        CPU_SOURCES + CUDA_SOURCES if sources is None else sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )


BUILD_INFO = os.path.join(ROOT, "fused_resnet", "_build_info.py")


def torch_requirement(version):
    """The requirement a build puts in its metadata: the torch release it was built against
    (`_C` links against that libtorch; another release fails to load it). The local label
    (+cu130, +cpu) is left out, so that PyPI's wheel of that release satisfies it."""
    return f"torch=={version.split('+')[0]}"


def write_build_info(torch_version, cuda_version, path=BUILD_INFO):
    """fused_resnet/_build_info.py: the torch each build of `_C` was built against, by the
    extension's file suffix (builds for several Pythons share the source tree: the device twin's
    sits beside the default one), which the package compares with the running torch when it loads
    `_C` (fused_resnet/__init__.py)."""
    import importlib.machinery

    builds = {}
    if os.path.exists(path):
        namespace = {}
        with open(path) as f:
            exec(f.read(), namespace)
        builds = dict(namespace.get("BUILDS", {}))
    builds[importlib.machinery.EXTENSION_SUFFIXES[0]] = {"torch": torch_version, "cuda": cuda_version}
    with open(path, "w") as f:
        f.write(
            '"""Written by setup.py when it builds fused_resnet._C: the torch each build (by its file\n'
            'suffix) was built against."""\n\n'
            f"BUILDS = {builds!r}\n"
        )


# setuptools runs this file as __main__ (pip's build backend too); the test imports it for its flags.
if __name__ == "__main__":
    import torch

    write_build_info(torch.__version__, torch.version.cuda)
    setup(
        name="fused_resnet",
        version="0.1.0",
        description="Fused BatchNorm(+add)+ReLU kernels and ResNet blocks for PyTorch",
        packages=find_packages(include=["fused_resnet", "fused_resnet.*"]),
        python_requires=">=3.9",
        install_requires=[torch_requirement(torch.__version__)],
        ext_modules=[extension(cuda=_want_cuda() and bool(CUDA_SOURCES))],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )
