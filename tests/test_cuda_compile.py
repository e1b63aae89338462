"""Every CUDA source compiles with this machine's nvcc, with the build's own flags, without a GPU.

The CUDA sources are the .cu files (kernels) and the .cpp files (their host ops) under csrc/cuda.
They are compiled by torch.utils.cpp_extension.BuildExtension itself, from setup.py's own extension
definition (include paths, nvcc flags, architectures), so the C++ standard, the CUDA toolkit and
every flag are the ones `pip install -e .` uses; only the final link is left out, so a CPU build of
PyTorch, which lacks torch's CUDA libraries, is enough. That wheel also lacks one generated header,
c10/cuda/impl/cuda_cmake_macros.h: an empty stand-in is supplied in a temporary include folder.

Where the loaded extension already holds the CUDA kernels, the build compiled and linked these same
sources with these same flags, and the test is skipped as redundant, unless FUSED_RESNET_NVCC_CHECK=1
(what `make nvcc-check` sets).
"""

import importlib.util
import os
import pathlib
import shutil

import pytest
import torch
from setuptools import Distribution
from torch.utils import cpp_extension

import fused_resnet  # noqa: F401  (loads the extension, if built)

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_setup():
    spec = importlib.util.spec_from_file_location("fused_resnet_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the extension; setup() runs only as __main__
    return module


BUILD = _load_setup()
FORCED = os.environ.get("FUSED_RESNET_NVCC_CHECK") == "1"
CUDA_BUILT = fused_resnet.EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fused_resnet::_bn_act_fwd_train", "CUDA"
)


class CompileOnly(cpp_extension.BuildExtension):
    """BuildExtension with the link left out: every object is compiled as the build does."""

    def build_extension(self, ext):
        self.compiler.link_shared_object = lambda *args, **kwargs: None
        super().build_extension(ext)


@pytest.mark.skipif(CUDA_BUILT and not FORCED, reason="the extension's own build compiled and linked the CUDA kernels")
@pytest.mark.skipif(shutil.which("nvcc") is None and cpp_extension.CUDA_HOME is None, reason="nvcc not found")
@pytest.mark.skipif(not BUILD.CUDA_SOURCES, reason="no CUDA sources under csrc/cuda")
def test_cuda_sources_compile(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert BUILD._cuda_home() is not None, "no CUDA toolkit with include/cuda_runtime_api.h found"
    ext = BUILD.extension(cuda=True, sources=BUILD.CUDA_SOURCES)
    torch_include = pathlib.Path(torch.__file__).parent / "include"
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        stub = tmp_path / "stub"
        (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
        (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("")
        ext.include_dirs.append(str(stub))

    dist = Distribution({"name": "fused_resnet", "ext_modules": [ext]})
    dist.cmdclass["build_ext"] = CompileOnly.with_options(use_ninja=True)
    command = dist.get_command_obj("build_ext")
    command.build_temp = str(tmp_path / "temp")
    command.build_lib = str(tmp_path / "lib")
    command.ensure_finalized()
    command.run()  # raises on the first compile error, with nvcc's message

    objects = sorted(p.name for p in (tmp_path / "temp").rglob("*.o"))
    expected = sorted(pathlib.Path(s).stem + ".o" for s in BUILD.CUDA_SOURCES)
    assert objects == expected
    for path in (tmp_path / "temp").rglob("*.o"):
        assert path.stat().st_size > 0, f"{path.name}: empty object file"
