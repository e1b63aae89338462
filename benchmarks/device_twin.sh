#!/usr/bin/env bash
# benchmarks/device_twin.sh (make device-twin): the GPU machine's software stack on this machine.
#
# The GPU machine runs Python 3.12, torch 2.11.0+cu130 and triton 3.6.0; PyPI's torch==2.11.0 is
# that same build. In a cached virtual environment with them (benchmarks/torch_venv.sh) this:
#   1. builds fused_resnet/_C.cpython-312-x86_64-linux-gnu.so with the CUDA kernels for sm_90 only
#      (TORCH_CUDA_ARCH_LIST=9.0): the build that travels to the GPU machine with the working tree,
#      so that no device time goes to compiling (the device tool carries at most 64 MiB);
#   2. compiles every Triton kernel for sm_90 with triton 3.6's own compiler (no GPU needed);
#   3. runs the CPU test suite: the C++ CPU kernels, the Triton kernels under the interpreter.
# Python 3.11 builds (_C.cpython-311-*.so) in the checkout are left alone.
# Env: TWIN_PYTEST_ARGS (extra pytest arguments, e.g. "-x" or "-k triton"), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
# numpy<2.4: triton 3.6's interpreter (not its compiler) keeps program ids as 1-element arrays
# and loop bounds made from them reach int(), which NumPy 2.4 refuses ("only 0-dimensional arrays
# can be converted to Python scalars"); triton 3.8's interpreter makes them 0-dimensional.
# torchvision 0.26.0 (torch 2.11's) and timm: the GPU machine's image has both (device KINDS.md),
# so there the model-zoo, interop and frozen tests run, on CUDA tensors; here they run first.
venv=$(bash benchmarks/torch_venv.sh 2.11.0 3.12 triton==3.6.0 "numpy<2.4" pytest pytest-xdist \
  pytest-benchmark hypothesis scikit-learn tqdm matplotlib torchvision==0.26.0 timm)
python="$venv/bin/python"
"$python" -c 'import sys, torch, triton; print("device twin: Python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)'

echo "== build for sm_90"
mkdir -p build
start=$SECONDS
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-2} "$python" setup.py build_ext --inplace > build/device-twin-build.log 2>&1 \
  || { tail -n 30 build/device-twin-build.log; exit 1; }
so=$(ls fused_resnet/_C.cpython-312-*.so)
size=$(stat -c %s "$so")
echo "built $so: $((size / 1048576)) MiB in $((SECONDS - start)) s"
((size < 64 * 1048576)) || { echo "the carried build must stay under 64 MiB"; exit 1; }
PYTHONPATH=$PWD "$python" -c '
import torch, fused_resnet
assert fused_resnet.EXTENSION_ERROR is None, fused_resnet.EXTENSION_ERROR
assert torch._C._dispatch_has_kernel_for_dispatch_key("fused_resnet::_bn_act_fwd_train", "CUDA")
print("the build loads, CUDA kernels registered")'

echo "== Triton kernels compiled for sm_90 by triton $("$python" -c 'import triton; print(triton.__version__)')"
PYTHONPATH=$PWD TRITON_INTERPRET=0 "$python" tests/compile_triton_kernels.py 90

echo "== CPU test suite"
PYTHONPATH=$PWD "$python" -m pytest tests -q -p no:cacheprovider -n 2 \
  --deselect tests/test_triton.py::test_kernels_compile_for_gpu ${TWIN_PYTEST_ARGS:-}
