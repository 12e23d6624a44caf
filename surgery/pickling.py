"""Captured modules that survive ``torch.save`` / ``torch.load``.

``fx.GraphModule`` pickles its generated code and, when unpickled, traces that code again with
plain symbolic tracing. A graph captured with concrete values does not survive that: its code
branches on sizes and slices by traced sizes (every Hugging Face model, timm's Gemma-4 ViT), so
``torch.load`` of a model that ``torch.save`` wrote raised. Every GraphModule surgery builds is a
:class:`CapturedGraphModule`, which pickles its graph instead, as plain data (its nodes in order),
and is rebuilt from it as it was: same nodes, submodules, parameters, flags and metadata, the code
generated afresh. The file is tied to torch's Graph format, which fx does not promise to keep
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
import functools
import importlib
import pickle
from typing import Any, Callable

import torch.fx as fx

__all__ = ["CapturedGraphModule"]

# graph attributes capture sets (surgery.capture): kept with the pickled graph
_GRAPH_ATTRIBUTES = ("_surgery_guards", "_surgery_specialised", "_tracer_extras")


_PICKLABLE: dict[Any, bool] = {}


def _by_reference(target: Callable[..., Any]) -> bool:
    """Whether pickle can store `target` by reference (torch.nn.functional's boolean-dispatched
    functions, max_pool2d among them, are local functions that it cannot)."""
    if target not in _PICKLABLE:
        try:
            pickle.dumps(target)
            _PICKLABLE[target] = True
        except Exception:
            _PICKLABLE[target] = False
    return _PICKLABLE[target]


@functools.lru_cache(maxsize=None)
def resolve(name: str) -> Any:
    """The object named ``"module:qualname"``."""
    module, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class _ByName:
    """Stands for a function in a pickled graph: unpickles as the attribute of its module that
    bears its name (``torch.nn.functional:max_pool2d``), as its generated code would name it."""

    def __init__(self, target: Callable[..., Any]):
        self.name = f"{target.__module__}:{target.__name__}"

    def __reduce__(self) -> tuple[Any, ...]:
        return resolve, (self.name,)


class _NodeName:
    """Stands for a node among a pickled node's arguments."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return _NodeName, (self.name,)


def _holds_node(value: Any) -> bool:
    found = []
    fx.node.map_aggregate(value, lambda v: found.append(v) if isinstance(v, fx.Node) else None)
    return bool(found)


def _portable(graph: fx.Graph) -> dict[str, Any]:
    """`graph` as plain data: its nodes in order (op, target, arguments with nodes named, name,
    type, metadata), its code generator and the attributes capture set. A Graph object itself
    would carry its owning module (pickling that recurses into the module being pickled) and
    tables keyed by the functions it calls. A function pickle cannot store by reference is stored
    by the name its generated code gives it."""
    def named(v: Any) -> Any:
        return _NodeName(v.name) if isinstance(v, fx.Node) else v

    nodes = []
    for n in graph.nodes:
        target = n.target
        if n.op == "call_function" and not _by_reference(target):
            target = _ByName(target)
        meta = {k: v for k, v in n.meta.items() if not _holds_node(v)}
        nodes.append((n.op, target, fx.node.map_aggregate(n.args, named), fx.node.map_aggregate(n.kwargs, named),
                      n.name, n.type, meta))
    return {"nodes": nodes, "codegen": copy.deepcopy(graph._codegen), "tracer_cls": graph._tracer_cls,
            "attributes": {k: getattr(graph, k) for k in _GRAPH_ATTRIBUTES if hasattr(graph, k)}}


def _graph(data: dict[str, Any]) -> fx.Graph:
    """The Graph :func:`_portable` described."""
    graph = fx.Graph(tracer_cls=data["tracer_cls"])
    env: dict[str, fx.Node] = {}

    def node(v: Any) -> Any:
        return env[v.name] if isinstance(v, _NodeName) else v

    for op, target, args, kwargs, name, type_expr, meta in data["nodes"]:
        n = graph.create_node(op, target, fx.node.map_aggregate(args, node), fx.node.map_aggregate(kwargs, node),
                              name=name, type_expr=type_expr)
        n.meta.update(meta)
        env[name] = n
    graph._codegen = data["codegen"]
    for k, v in data["attributes"].items():
        setattr(graph, k, v)
    return graph


def _rebuild(class_name: str, state: dict[str, Any], graph: dict[str, Any]) -> CapturedGraphModule:
    """The module :meth:`CapturedGraphModule.__reduce__` pickled: its state as it was, its graph,
    its code generated from the graph."""
    gm = CapturedGraphModule.__new__(CapturedGraphModule)  # fx's __new__: a class of its own
    gm.__dict__.update(state)
    type(gm).__name__ = class_name
    gm.graph = _graph(graph)  # owning module, and recompile()
    return gm


class CapturedGraphModule(fx.GraphModule):
    """An ``fx.GraphModule`` that pickles its graph, not its code (see the module doc)."""

    def __reduce__(self) -> tuple[Any, ...]:
        state = self.__dict__.copy()
        graph = state.pop("_graph")
        state.pop("_code", None)  # generated again from the graph
        return _rebuild, (type(self).__name__, state, _portable(graph))
