"""Graphs nested under eager code: where they are, and the shapes of their nodes.

When a model's top-level forward is data-dependent (detection), capture keeps that forward
eager (the node ``model`` of a *shell*) and traces its children instead: the traced graphs then
sit inside an eager module, which calls them from Python. :func:`nested_graphs` finds them;
:func:`recording_shapes` makes each of them record its nodes' shapes while an interpreter
(:class:`surgery.shapes.ShapeProp`) runs the outer graph, as the outer graph's own nodes do;
:func:`recording_calls` keeps what eager code passes each of them and what it gets back, and
:func:`replay` runs them again on those arguments: Shrink verifies every nested graph so, besides
the model's output (which eager post-processing may reduce to nothing, or blur: a rounding-level
change in one graph's output can change which proposals the next graph is given).

Eager code may call one nested graph several times (a detection head, once per feature level).
The shapes of its first call are kept; an axis whose size differed between calls is listed in
the node's ``meta["shape_varies"]`` (a tuple of axes, or True when the structure differed), so
the channel analysis can refuse to cut channels that vary along it.

The same run records *hand-offs*: a tensor that one nested graph returns and eager code passes,
unchanged, to another (an SSD's feature maps, from its backbone to its head). Eager code may read
its metadata (the anchors read the maps' sizes); a tensor it computes with, or that the model
returns, is no hand-off. The channel analysis walks graphs joined by hand-offs as one
(:mod:`surgery.channels.boundary`), so their channels are pruned on both sides.

Before tracing the children of eager code, capture runs the model once and keeps what each
child receives (:func:`submodule_examples`): a child that plain fx cannot trace (a head that
iterates over its list of feature maps) is traced again with those values known.

Example::

    >>> import torch, torchvision, surgery
    >>> from surgery.nested import nested_graphs
    >>> model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    >>> gm = surgery.capture(model.eval(), ([torch.rand(3, 320, 320)],))
    >>> sorted(nested_graphs(gm))[:1]
    ['model.backbone']
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .calling import call
from .copying import tree_modules
from .verify import eval_mode

__all__ = ["nested_graphs", "submodule_examples", "output_items", "recording_shapes", "Recording", "recording_calls",
           "replay"]


def nested_graphs(root: nn.Module) -> dict[str, fx.GraphModule]:
    """Every GraphModule in `root`'s module tree other than `root` itself, by qualified path
    (in module order; a module reachable under two names counts once, at its first)."""
    if not any(isinstance(m, fx.GraphModule) for m in tree_modules(root)[1:]):  # the usual case, found fast
        return {}
    return {name: m for name, m in root.named_modules() if name and isinstance(m, fx.GraphModule)}


def _varying_axes(a: Any, b: Any) -> tuple[int, ...] | bool:
    """The axes along which shape `a` and shape `b` differ (True: not comparable axis by axis)."""
    if isinstance(a, torch.Size) and isinstance(b, torch.Size):
        return tuple(d for d in range(len(a)) if a[d] != b[d]) if len(a) == len(b) else True
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and a and \
            all(isinstance(s, torch.Size) for s in (*a, *b)):
        parts = [_varying_axes(x, y) for x, y in zip(a, b)]
        if any(p is True for p in parts):
            return True
        return tuple(sorted({d for p in parts for d in p}))
    return True


def output_items(value: Any) -> list[Any]:
    """What a graph returns, one level deep: the tensor itself, or the items of a tuple or list,
    or the values of a dict (in order): the *leaves* that a hand-off names by position. Works
    on a graph's output node's argument and on the value it returned alike."""
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, (tuple, list)) else [value]


# what eager code may read of a tensor it hands on: metadata, no values
_METADATA = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad", "size", "dim",
                       "__len__", "is_floating_point", "is_complex", "get_device"})


class _Handoffs(TorchFunctionMode):
    """Which tensors that one nested graph returns eager code hands, unchanged, to another (a
    backbone's feature maps, passed on to a head): recorded while eager code runs, so that the
    channel analysis can follow channels from graph to graph (see :mod:`surgery.channels.boundary`).
    A tensor that eager code computes with (any torch function other than a metadata read) or
    that the model returns is not handed off: its channels stay frozen at the boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.made: dict[int, tuple[str, int]] = {}  # id(tensor) -> (graph path, leaf)
        self.kept: list[torch.Tensor] = []  # alive until the run ends, so that ids stay unique
        self.escaped: set[int] = set()
        self.inside = 0  # > 0 while a nested graph runs: its own ops are the analysis' business
        self.received: dict[str, list[tuple[int, int | None, int]]] = {}  # path -> (placeholder, item, id)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if not self.inside and self.made:
            name = func.__name__
            if name == "__get__":
                name = getattr(getattr(func, "__self__", None), "__name__", name)
            if name not in _METADATA:
                self.escape((args, kwargs))
        return func(*args, **kwargs)

    def escape(self, value: Any) -> None:
        for t in tree_leaves(value):
            if isinstance(t, torch.Tensor) and id(t) in self.made:
                self.escaped.add(id(t))

    def receive(self, path: str, args: tuple) -> None:
        for i, a in enumerate(args):
            items = [(None, a)] if isinstance(a, torch.Tensor) else enumerate(a) if isinstance(a, (list, tuple)) else ()
            self.received.setdefault(path, []).extend((i, j, id(t)) for j, t in items if isinstance(t, torch.Tensor))

    def make(self, path: str, out: Any) -> None:
        for j, t in enumerate(output_items(out)):
            if isinstance(t, torch.Tensor):
                self.made.setdefault(id(t), (path, j))
                self.kept.append(t)

    def write(self, subs: dict[str, fx.GraphModule], calls: dict[str, int]) -> None:
        """Record the hand-offs in node meta: ``placeholder.meta["handoff"]`` maps an item of the
        placeholder (None: the placeholder itself) to (source path, leaf); the source's output node
        lists in ``meta["handed"]`` the paths each of its leaves goes to. Graphs called more than
        once take part in none (each call may get other tensors)."""
        for sub in subs.values():
            for n in (*sub.graph.find_nodes(op="placeholder"), *sub.graph.find_nodes(op="output")):
                for key in ("handoff", "handed"):  # an earlier run's
                    n.meta.pop(key, None)
        for path, got in self.received.items():
            if calls.get(path) != 1:
                continue
            phs = subs[path].graph.find_nodes(op="placeholder")
            for i, j, key in got:
                src = self.made.get(key)
                if src is None or key in self.escaped or src[0] == path or calls.get(src[0]) != 1 or i >= len(phs):
                    continue
                phs[i].meta.setdefault("handoff", {})[j] = src
                out = subs[src[0]].graph.find_nodes(op="output")[0]
                out.meta.setdefault("handed", {}).setdefault(src[1], []).append(path)


class _Recorder:
    """Stands in for a nested GraphModule's forward: runs its graph through `interpreter`, which
    annotates the nodes, and merges the shapes of later calls into those of the first."""

    def __init__(self, gm: fx.GraphModule, interpreter: type, path: str = "", handoffs: _Handoffs | None = None):
        self.gm, self.interpreter, self.calls, self.path, self.handoffs = gm, interpreter, 0, path, handoffs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        nodes = list(self.gm.graph.nodes)
        before = [(n.meta.get("shape"), n.meta.get("dtype")) for n in nodes] if self.calls else None
        h = self.handoffs
        if h is not None:
            names = [str(n.target) for n in self.gm.graph.find_nodes(op="placeholder")]
            h.receive(self.path, (*args, *(kwargs[k] for k in names[len(args):] if k in kwargs)))
            h.inside += 1
        try:
            out = self.interpreter(self.gm).propagate(*args, **kwargs)
        finally:
            if h is not None:
                h.inside -= 1
        if h is not None:
            h.make(self.path, out)
        if before is None:  # the first call of this run: what an earlier run found is stale
            for n in nodes:
                n.meta.pop("shape_varies", None)
        else:
            for n, (shape, dtype) in zip(nodes, before):
                if n.meta.get("shape") != shape:
                    axes = _varying_axes(shape, n.meta.get("shape"))
                    seen = n.meta.get("shape_varies", ())
                    n.meta["shape_varies"] = True if True in (axes, seen) else tuple(sorted({*seen, *axes}))
                n.meta["shape"], n.meta["dtype"] = shape, dtype
        self.calls += 1
        return out


class Recording:
    """What :func:`recording_shapes` yields: the number of calls per nested path once the block
    ends, and :meth:`returned`, which the runner calls with the model's output (a tensor that a
    nested graph made and the model returns is no hand-off)."""

    def __init__(self, handoffs: _Handoffs | None = None):
        self.calls: dict[str, int] = {}
        self.handoffs = handoffs

    def returned(self, value: Any) -> Any:
        if self.handoffs is not None:
            self.handoffs.escape(value)
        return value


@contextmanager
def recording_shapes(root: nn.Module, interpreter: type) -> Iterator[Recording]:
    """While active, every graph nested in `root` runs through ``interpreter(gm).propagate``
    when eager code calls it (``interpreter`` annotates node shapes: ShapeProp), and the tensors
    that eager code hands from one nested graph to another are recorded (:class:`_Handoffs`).
    Yields a :class:`Recording`. A no-op without nested graphs."""
    # a graph nested two deep is already recorded by the run of the outer graph that holds it
    subs = {p: m for p, m in nested_graphs(root).items() if not isinstance(m.__dict__.get("forward"), _Recorder)}
    if not subs:
        yield Recording()
        return
    handoffs = _Handoffs() if len(subs) > 1 else None
    run = Recording(handoffs)
    recorders = {}
    for path, sub in subs.items():
        recorders[path] = _Recorder(sub, interpreter, path, handoffs)
        # an instance attribute: nn.Module.__call__ finds it before the class's generated forward
        sub.__dict__["forward"] = recorders[path]
    done = False
    try:
        with handoffs if handoffs is not None else nullcontext():
            yield run
        done = True
    finally:
        for path, sub in subs.items():
            sub.__dict__.pop("forward", None)
            run.calls[path] = recorders[path].calls
        if handoffs is not None and done:
            handoffs.write(subs, run.calls)


@contextmanager
def recording_calls(root: nn.Module) -> Iterator[dict[str, list[tuple[tuple, dict, Any]]]]:
    """While active, every call that eager code makes to a graph nested in `root`, as
    ``(args, kwargs, output)``, by qualified path (an entry per nested graph, even one never called)."""
    calls: dict[str, list[tuple[tuple, dict, Any]]] = {}
    handles = [sub.register_forward_hook(lambda m, args, kwargs, out, seen=calls.setdefault(path, []):
                                         seen.append((args, kwargs, out)), with_kwargs=True)
               for path, sub in nested_graphs(root).items()]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def replay(root: nn.Module, calls: dict[str, list[tuple[tuple, dict, Any]]]) -> dict[str, list[Any]]:
    """Run each graph nested in `root` again on the arguments of the calls recorded (from this
    model or another of the same tree: a masked model's, to check its shrunk copy graph by graph,
    where eager code between the graphs cannot blur the comparison). Outputs by path, per call."""
    subs = nested_graphs(root)
    with eval_mode(root):
        return {path: [subs[path](*args, **kwargs) for args, kwargs, _ in seen] for path, seen in calls.items()}


@torch.no_grad()
def submodule_examples(root: nn.Module, inputs: tuple | dict[str, Any]) -> dict[int, dict[str, Any]]:
    """What each submodule of `root` with children of its own receives when `root` runs eagerly on
    `inputs` (in eval mode), as argument name -> value, by ``id(module)``; only modules called
    exactly once, with arguments that bind to their forward's named parameters. Capture traces
    a child of eager code with these beside the proxies (see :mod:`surgery.concrete`): a list of
    feature maps can then be iterated, a size read."""
    seen: dict[int, Any] = {}

    def hook(m: nn.Module, args: tuple, kwargs: dict) -> None:
        seen[id(m)] = None if id(m) in seen else (m, args, kwargs)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
               for m in root.modules() if m is not root and next(m.children(), None) is not None]
    try:
        with eval_mode(root):
            call(root, inputs)
    except Exception:  # what capture then does without examples, as before
        return {}
    finally:
        for h in handles:
            h.remove()
    out = {}
    for key, entry in seen.items():
        if entry is None:
            continue
        m, args, kwargs = entry
        try:
            bound = inspect.signature(m.forward).bind(*args, **kwargs)
        except (TypeError, ValueError):
            continue
        params = inspect.signature(m.forward).parameters
        if all(params[k].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
               for k in bound.arguments):
            out[key] = dict(bound.arguments)
    return out
