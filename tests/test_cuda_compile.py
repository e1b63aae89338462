"""Every CUDA source compiles with this machine's nvcc, for the GPU architectures the build ships.

The CUDA sources are the .cu files under csrc/ (kernels) and the .cpp files under csrc/cuda/ (their
host ops, which need the CUDA headers and are only built with CUDA; nvcc hands them to the host
compiler). Compile-only (`nvcc -c`): nothing is linked or run, so no GPU is needed, and a CPU build
of PyTorch is enough. That wheel lacks one generated header, c10/cuda/impl/cuda_cmake_macros.h; an empty
stand-in is supplied in a temporary include folder (only when the header is missing). The flags are
the build's own (setup.py, torch.utils.cpp_extension), with both architectures in one nvcc call per
file and the files compiled in parallel. Skipped, with the reason, where nvcc is absent.
"""

import concurrent.futures
import os
import pathlib
import shutil
import subprocess
import sysconfig
import time

import pytest
import torch
from torch.utils import cpp_extension

ROOT = pathlib.Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc").rglob("*.cu")) + sorted((ROOT / "csrc" / "cuda").glob("*.cpp"))
ARCHS = ("80", "90")


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    if cpp_extension.CUDA_HOME:
        candidate = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        if os.path.exists(candidate):
            return candidate
    return None


NVCC = _nvcc()


def _command(source, output, include_dirs):
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    includes = [f"-I{d}" for d in include_dirs]
    # The sources are C++17 (torch's own headers may ask for C++20 features; nvcc only warns).
    return (
        [NVCC, "-c", str(source), "-o", str(output), "-std=c++17", "-O3"]
        + includes
        + cpp_extension.COMMON_NVCC_FLAGS
        + ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
        + gencode
    )


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (neither on PATH nor under CUDA_HOME)")
@pytest.mark.skipif(not CUDA_SOURCES, reason="no CUDA sources under csrc/")
def test_cuda_sources_compile(tmp_path):
    torch_include = pathlib.Path(torch.__file__).parent / "include"
    include_dirs = [
        ROOT / "csrc",
        torch_include,
        torch_include / "torch" / "csrc" / "api" / "include",
        sysconfig.get_paths()["include"],
    ]
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        stub = tmp_path / "stub"
        (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
        (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("")
        include_dirs.append(stub)

    def compile_one(source):
        output = tmp_path / (source.name + ".o")
        start = time.perf_counter()
        result = subprocess.run(
            _command(source, output, include_dirs), capture_output=True, text=True, cwd=ROOT
        )
        return source, result, time.perf_counter() - start

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(compile_one, CUDA_SOURCES))
    wall = time.perf_counter() - start

    failures = []
    for source, result, _seconds in results:
        if result.returncode != 0:
            errors = [line for line in (result.stdout + result.stderr).splitlines() if "error" in line]
            failures.append(f"{source.relative_to(ROOT)} (exit {result.returncode}):\n  " + "\n  ".join(errors[:10]))
    timings = ", ".join(f"{s.name} {t:.0f}s" for s, _, t in results)
    print(f"nvcc compiled {len(results)} files for sm_{', sm_'.join(ARCHS)} in {wall:.0f}s ({timings})")
    assert not failures, "CUDA sources failed to compile:\n" + "\n".join(failures)
    for source, _, _ in results:
        assert (tmp_path / (source.name + ".o")).stat().st_size > 0, f"{source.name}: no object file"
