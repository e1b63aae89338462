"""How the fused modules, and the functions convert() puts in generated forwards, meet torch.fx and
TorchScript.

torch.fx's default tracer treats only torch.nn's own modules as leaves and runs every other
module's forward on Proxies. The fused modules' forward checks its input's shape and reads its
buffers in Python, which symbolic tracing cannot follow, and so do convert()'s graph functions.
So each records itself as one node when a torch.fx.Proxy is among its arguments: a module as a
`call_module` node (a leaf, as nn.BatchNorm2d is), a function as a `call_function` node. It goes
through the tracer's own `path_of_module` and `create_proxy`, so any Tracer subclass works
(torchvision's create_feature_extractor, torch.fx.experimental.optimization.fuse, ...).

TorchScript cannot compile them (their forwards dispatch to custom ops through Python): scripting
a model that holds one fails at once with refuse_script's message, which names the alternatives.
"""

import torch.fx


def _tracer(args):
    for arg in args:
        if isinstance(arg, torch.fx.Proxy):
            return arg.tracer
    return None


def record_module_call(module, *args):
    """The Proxy of `module(*args)` as one call_module node while torch.fx traces, else None."""
    tracer = _tracer(args)
    if tracer is None:
        return None
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


def record_function_call(function, *args):
    """The Proxy of `function(*args)` as one call_function node while torch.fx traces, else None.
    A module among `args` becomes a get_attr node of the traced root."""
    tracer = _tracer(args)
    if tracer is None:
        return None
    return tracer.create_proxy("call_function", function, args, {})


def refuse_script(module):
    """__prepare_scriptable__ of the modules TorchScript cannot compile."""
    raise RuntimeError(
        f"torch.jit.script cannot compile {type(module).__module__}.{type(module).__qualname__}: "
        "fused_resnet's modules call their kernels through Python custom-op dispatch. Use "
        "torch.jit.trace, torch.export or torch.compile instead, or script the model before "
        "fused_resnet.convert / after fused_resnet.unfuse"
    )
