"""All or nothing: `with all_or_nothing(model) as undo:` restores `model` exactly as it was when
the block raises: every module's class, attributes, submodules, parameters and buffers (the
same objects), a GraphModule's graph and code, and the values of the tensors the block named with
undo.save(tensor) before writing them in place."""

from contextlib import contextmanager

import torch
import torch.fx


class _Snapshot:
    def __init__(self, model):
        self.modules = []
        for module in model.modules():
            held = (dict(module._modules), dict(module._parameters), dict(module._buffers))
            meta = dict(module.meta) if isinstance(module, torch.fx.GraphModule) else None
            self.modules.append((module, type(module), dict(module.__dict__), held, meta))
        self.tensors = []

    def save(self, tensor):
        """Keep `tensor`'s values, about to be written in place."""
        self.tensors.append((tensor, tensor.detach().clone()))

    @torch.no_grad()
    def restore(self):
        for tensor, values in reversed(self.tensors):
            tensor.copy_(values)
        for module, cls, attributes, held, meta in self.modules:
            for live, saved in zip((module._modules, module._parameters, module._buffers), held):
                live.clear()
                live.update(saved)
            module.__class__ = cls
            module.__dict__.clear()
            module.__dict__.update(attributes)
            if meta is not None:
                module.meta.clear()
                module.meta.update(meta)
                module.recompile()  # the code of the graph it has again


@contextmanager
def all_or_nothing(model):
    snapshot = _Snapshot(model)
    try:
        yield snapshot
    except BaseException:
        snapshot.restore()
        raise
