"""The (atol, rtol) table of the suite, per input dtype: importable on its own (no fused_resnet, no
TRITON_INTERPRET decision), so that scripts outside pytest (benchmarks/gpu_correctness.py) judge
with the same numbers as tests/conftest.py.

The oracle runs in float64, so these are the error of the backend's own arithmetic: fp32
accumulation for fp32/fp16/bf16, and one rounding of the result to the activation dtype. One pair
serves outputs, gradients and running statistics alike.
"""

import torch

TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
