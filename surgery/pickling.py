"""Captured modules that survive ``torch.save`` / ``torch.load``.

``fx.GraphModule`` pickles its generated code and, when unpickled, traces that code again with
plain symbolic tracing. A graph captured with concrete values does not survive that: its code
branches on sizes and slices by traced sizes (every Hugging Face model, timm's Gemma-4 ViT), so
``torch.load`` of a model that ``torch.save`` wrote raised. Every GraphModule surgery builds is a
:class:`CapturedGraphModule`, which pickles its graph instead (a copy of it without the owning
module) and is rebuilt from it as it was: same submodules, parameters, flags and metadata, the
code generated afresh. The file is tied to torch's Graph format, which fx does not promise to keep
across versions; files meant to outlive a torch upgrade are what :func:`surgery.save_pruned`
(a plan and safetensors) and :func:`surgery.export` (TorchScript, .pt2, ONNX) write.

Example::

    >>> import io, torch
    >>> from surgery import capture
    >>> gm = capture(torch.nn.Sequential(torch.nn.Linear(4, 2)), (torch.randn(1, 4),))
    >>> buf = io.BytesIO(); torch.save(gm, buf); _ = buf.seek(0)
    >>> back = torch.load(buf, weights_only=False)      # a trusted file: it holds code
    >>> type(back).__name__, [n.op for n in back.graph.nodes]
    ('Sequential', ['placeholder', 'call_module', 'output'])
"""
from __future__ import annotations

import copy
from typing import Any

import torch.fx as fx

__all__ = ["CapturedGraphModule"]

# graph attributes capture sets (surgery.capture): kept with the pickled graph
_GRAPH_ATTRIBUTES = ("_surgery_guards", "_surgery_specialised", "_tracer_extras")


def _portable(graph: fx.Graph) -> fx.Graph:
    """A copy of `graph` that holds no reference to its owning module (pickling that would
    recurse into the module being pickled)."""
    copied = fx.Graph(tracer_cls=graph._tracer_cls)
    out = copied.graph_copy(graph, {})  # every node but the output; returns what the output returns
    for output in graph.find_nodes(op="output"):
        copied.output(out, type_expr=output.type).meta = copy.copy(output.meta)
    copied._codegen = copy.deepcopy(graph._codegen)
    for name in _GRAPH_ATTRIBUTES:
        if hasattr(graph, name):
            setattr(copied, name, getattr(graph, name))
    return copied


def _rebuild(class_name: str, state: dict[str, Any], graph: fx.Graph) -> CapturedGraphModule:
    """The module :meth:`CapturedGraphModule.__reduce__` pickled: its state as it was, its graph,
    its code generated from the graph."""
    gm = CapturedGraphModule.__new__(CapturedGraphModule)  # fx's __new__: a class of its own
    gm.__dict__.update(state)
    type(gm).__name__ = class_name
    gm.graph = graph  # owning module, and recompile()
    return gm


class CapturedGraphModule(fx.GraphModule):
    """An ``fx.GraphModule`` that pickles its graph, not its code (see the module doc)."""

    def __reduce__(self) -> tuple[Any, ...]:
        state = self.__dict__.copy()
        graph = state.pop("_graph")
        state.pop("_code", None)  # generated again from the graph
        return _rebuild, (type(self).__name__, state, _portable(graph))
