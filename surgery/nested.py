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

Example::

    >>> import torch, torchvision, surgery
    >>> from surgery.nested import nested_graphs
    >>> model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    >>> gm = surgery.capture(model.eval(), ([torch.rand(3, 320, 320)],))
    >>> sorted(nested_graphs(gm))[:1]
    ['model.backbone']
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn

from .verify import eval_mode

__all__ = ["nested_graphs", "recording_shapes", "recording_calls", "replay"]


def nested_graphs(root: nn.Module) -> dict[str, fx.GraphModule]:
    """Every GraphModule in `root`'s module tree other than `root` itself, by qualified path
    (in module order; a module reachable under two names counts once, at its first)."""
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


class _Recorder:
    """Stands in for a nested GraphModule's forward: runs its graph through `interpreter`, which
    annotates the nodes, and merges the shapes of later calls into those of the first."""

    def __init__(self, gm: fx.GraphModule, interpreter: type):
        self.gm, self.interpreter, self.calls = gm, interpreter, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        nodes = list(self.gm.graph.nodes)
        before = [(n.meta.get("shape"), n.meta.get("dtype")) for n in nodes] if self.calls else None
        out = self.interpreter(self.gm).propagate(*args, **kwargs)
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


@contextmanager
def recording_shapes(root: nn.Module, interpreter: type) -> Iterator[dict[str, int]]:
    """While active, every graph nested in `root` runs through ``interpreter(gm).propagate``
    when eager code calls it (``interpreter`` annotates node shapes: ShapeProp). Yields a dict
    that, once the block ends, holds the number of calls per nested path (0: its shapes are
    those of an earlier run, or none). A no-op without nested graphs."""
    # a graph nested two deep is already recorded by the run of the outer graph that holds it
    subs = {p: m for p, m in nested_graphs(root).items() if not isinstance(m.__dict__.get("forward"), _Recorder)}
    calls: dict[str, int] = {}
    if not subs:
        yield calls
        return
    recorders = {}
    for path, sub in subs.items():
        recorders[path] = _Recorder(sub, interpreter)
        # an instance attribute: nn.Module.__call__ finds it before the class's generated forward
        sub.__dict__["forward"] = recorders[path]
    try:
        yield calls
    finally:
        for path, sub in subs.items():
            sub.__dict__.pop("forward", None)
            calls[path] = recorders[path].calls


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
