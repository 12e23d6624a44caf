"""MAC counting for any model, TorchScript included: ops are seen at the dispatcher.

MACs are the multiply-accumulates of every convolution, matmul and linear op the model runs
(``torch.utils.flop_counter``'s formulas, halved). Each op is credited to the layer whose
parameter it reads (found by tensor storage, which works for eager modules, GraphModules and
TorchScript alike); an op that reads no parameter (an attention score matmul) goes to the
innermost eager layer running, or to ``(other)``.

Example::

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> count_macs(net, (torch.randn(3, 4),))
    {'0': 96, '2': 48}
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..calling import as_inputs, call, input_values
from ..copying import storage_key
from ..errors import SurgeryError, first_line
from ..verify import eval_mode

__all__ = ["count_macs", "OTHER", "ROOT"]

OTHER = "(other)"
ROOT = "(root)"


def _storage(t: Tensor) -> int:
    try:
        return storage_key(t)
    except Exception:  # tensors without storage (meta, functional wrappers)
        return 0


class _MacCounter(TorchDispatchMode):
    """Credit every op with a flop formula to the layer that owns one of its tensor arguments,
    else to the innermost running eager module (see :func:`count_macs`)."""

    def __init__(self, owners: dict[int, str], stack: list[str]):
        super().__init__()
        from torch.utils.flop_counter import flop_registry
        self.registry = flop_registry
        self.owners = owners
        self.stack = stack
        self.macs: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func.overloadpacket)
        if formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
            owner = next((self.owners[p] for a in args if isinstance(a, Tensor)
                          and (p := _storage(a)) in self.owners), None)
            owner = owner or (self.stack[-1] if self.stack else OTHER)
            self.macs[owner] = self.macs.get(owner, 0) + int(flops) // 2
        return out


def count_macs(model: nn.Module, inputs: Any, layer_names: Iterable[str] = ()) -> dict[str, int]:
    """Run `model` once on `inputs` (a tensor, a tuple of positional inputs or a dict of keyword
    inputs; eval mode, no grad; training flags restored) and return MACs per layer name;
    `layer_names` are the modules ops may be credited to when they read no parameter. Works on
    TorchScript modules too (ops are seen at the dispatcher)."""
    inputs = as_inputs(inputs, model)
    names = set(layer_names)
    owners: dict[int, str] = {}
    for mname, m in model.named_modules():
        for _, p in m.named_parameters(recurse=False):
            owners.setdefault(_storage(p), mname or ROOT)
    stack: list[str] = []
    handles = []
    if not isinstance(model, torch.jit.ScriptModule):
        for mname, m in model.named_modules():
            if mname in names:
                handles.append(m.register_forward_pre_hook(lambda _m, _a, n=mname: stack.append(n)))
                handles.append(m.register_forward_hook(lambda _m, _a, _o: stack.pop() and None))
    try:
        with eval_mode(model), torch.no_grad(), _MacCounter(owners, stack) as counter:
            call(model, inputs)
    except SurgeryError:
        raise
    except Exception as e:
        shapes = ", ".join(str(tuple(x.shape)) for x in input_values(inputs) if isinstance(x, Tensor))
        raise SurgeryError(f"running the model on input shape {shapes} failed: {first_line(e)}") from e
    finally:
        for h in handles:
            h.remove()
    return counter.macs
