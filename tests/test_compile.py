"""torch.compile(fullgraph=True) sees through the fused modules: no graph break, same results.

The aot_eager backend runs dynamo capture, the fake impls and AOT autograd, which is where these ops
can break a graph; inductor then calls them as opaque extern kernels."""

import pytest
import torch

import fused_resnet
from helpers import BACKENDS, DEVICE, assert_close, dynamo_backend_for, make_tensor

COMPILED = [b for b in BACKENDS if b != "reference"]


@pytest.mark.skipif(not COMPILED, reason="no compiled backend (fused_resnet._C not built)")
@pytest.mark.parametrize("backend_name", COMPILED)
def test_compile_fullgraph_module(backend_name):
    # Under the Triton interpreter wrap_triton hands back the raw interpreted kernel, which AOT
    # autograd cannot trace into; "eager" still checks dynamo's full-graph capture through the
    # fake impls (a CUDA run covers aot_eager, and test_triton.py inductor).
    compile_backend = dynamo_backend_for(backend_name)
    torch._dynamo.reset()
    bn = fused_resnet.nn.BatchNormAddReLU2d(4).to(DEVICE)
    eager_bn = fused_resnet.nn.BatchNormAddReLU2d(4).to(DEVICE)
    eager_bn.load_state_dict(bn.state_dict())

    def step(module, x, r):
        return module(x, r)

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    with fused_resnet.use_backend(backend_name):
        for training in (True, False):
            bn.train(training)
            eager_bn.train(training)
            x = make_tensor((3, 4, 5, 5), torch.float32, "channels_last").requires_grad_()
            r = make_tensor((3, 4, 5, 5), torch.float32).requires_grad_()
            x2, r2 = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
            out = compiled(bn, x, r)
            ref = step(eager_bn, x2, r2)
            assert_close(out, ref, torch.float32, "output")
            out.sum().backward()
            ref.sum().backward()
            assert_close(x.grad, x2.grad, torch.float32, "grad_input")
            assert_close(r.grad, r2.grad, torch.float32, "grad_residual")
            assert_close(bn.running_mean, eager_bn.running_mean, torch.float32, "running_mean")
            assert int(bn.num_batches_tracked) == int(eager_bn.num_batches_tracked)
