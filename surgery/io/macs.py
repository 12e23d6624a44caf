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

import contextlib
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..calling import as_inputs, bind_placeholders, call, input_values
from ..copying import storage_key
from ..errors import SurgeryError, first_line
from ..verify import eval_mode

__all__ = ["count_macs", "node_macs", "no_fast_paths", "flop_formulas", "EXTRA_FLOPS", "OTHER", "ROOT"]

OTHER = "(other)"
ROOT = "(root)"


def _storage(t: Tensor) -> int:
    try:
        return storage_key(t)
    except Exception:  # tensors without storage (meta, functional wrappers)
        return 0


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# ops torch's flop counter has no formula for: scaled_dot_product_attention on the CPU runs its own
# kernel (the CUDA ones are covered), so every SDPA model's attention MACs would go uncounted there
EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


def flop_formulas() -> dict:
    """torch's flop formulas (by op packet, on tensors) with :data:`EXTRA_FLOPS` added."""
    from torch.utils.flop_counter import flop_registry, shape_wrapper
    return {**flop_registry, **{op: shape_wrapper(f) for op, f in EXTRA_FLOPS.items()}}


class _MacCounter(TorchDispatchMode):
    """Credit every op with a flop formula to the layer that owns one of its tensor arguments,
    else to the innermost running eager module (see :func:`count_macs`)."""

    def __init__(self, owners: dict[int, str], stack: list[str]):
        super().__init__()
        self.registry = flop_formulas()
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


@contextlib.contextmanager
def no_fast_paths() -> Iterator[None]:
    """Run ``nn.MultiheadAttention`` through its plain ops: in eval mode without grad it takes a
    fused fast path (``_native_multi_head_attention``) that no flop formula covers, and its
    MACs (a ViT's attention, a third of ViT-B/16's) would go uncounted."""
    mha = getattr(torch.backends, "mha", None)
    was = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(was)


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
        with eval_mode(model), torch.no_grad(), no_fast_paths(), _MacCounter(owners, stack) as counter:
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


class _NodeCounter(TorchDispatchMode):
    """Credit every op with a flop formula to the graph node running it (see :func:`node_macs`)."""

    def __init__(self):
        super().__init__()
        self.registry = flop_formulas()
        self.node: fx.Node | None = None
        self.macs: dict[fx.Node, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func.overloadpacket)
        if formula is not None and self.node is not None:
            self.macs[self.node] = self.macs.get(self.node, 0) + int(formula(*args, **kwargs, out_val=out)) // 2
        return out


class _Stepper(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: _NodeCounter):
        super().__init__(gm)
        self.counter = counter

    def run_node(self, n: fx.Node) -> Any:
        self.counter.node = n
        return super().run_node(n)


def node_macs(gm: fx.GraphModule, inputs: Any) -> dict[fx.Node, int]:
    """MACs per node of `gm`'s graph, from one run on `inputs` (eval mode, no grad). A call into
    code the graph does not show (an opaque module, a nested graph under eager code) is credited
    whole to the node that calls it. ChannelPrune's budgets scale these by the channels kept."""
    inputs = as_inputs(inputs, gm)
    counter = _NodeCounter()
    with eval_mode(gm), torch.no_grad(), no_fast_paths(), counter:
        _Stepper(gm, counter).run(*bind_placeholders(gm.graph, inputs))
    return counter.macs
