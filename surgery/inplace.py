"""In-place ops in a captured graph: rewritten to their out-of-place form where that is exact,
marked where it is not.

A graph edge says "this node reads that node's value", but an in-place op (``c.add_(b)``,
``b.relu_()``, ``x += y``, ``nn.ReLU(inplace=True)``) changes a value that other nodes may read
later: after ``c.add_(b)`` every later reader of ``c`` sees ``c + b``, while the graph still
points them at ``c``. The channel analysis and the mask passes follow edges, so they would
reason about the wrong tensor. Capture therefore rewrites such an op ``y = x.op_(...)`` into
``y = x.op(...)`` and points the later readers of ``x`` at ``y``: exact when ``x`` owns its
memory (no view shares it, it is no model input or parameter) and the dtypes agree. An in-place
op that cannot be rewritten so gets ``node.meta["inplace"]``, a sentence naming it; the channel
analysis freezes the channels it touches. An in-place op whose input nobody reads afterwards
(``relu(inplace=True)`` after a BatchNorm, as in torchvision) is left alone: in place or not, the
graph computes the same.

Example::

    >>> import torch, surgery
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x):
    ...         y = x * 2
    ...         z = y.relu_()
    ...         return y + z
    >>> gm = surgery.capture(Net(), (torch.randn(3),))
    >>> [n.target for n in gm.graph.nodes if n.op == "call_method"]
    ['relu']
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .graph import IN_PLACE_OPERATORS, inplace_flag, inplace_kind, submodule

__all__ = ["rewrite_inplace"]

# ops whose output may share memory with their first input
_VIEWS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose",
          "permute", "t", "narrow", "select", "expand", "expand_as", "as_strided", "detach", "contiguous", "to",
          "type", "type_as", "float", "half", "double", "bfloat16", "int", "long", "bool", "chunk", "split",
          "unbind", "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal", "unfold", "view_as_real",
          "view_as_complex", "real", "imag", "getitem", "tensor_split", "split_with_sizes"}
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


def _name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _is_view(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        m = submodule(gm, str(node.target))
        return isinstance(m, _VIEW_MODULES) or bool(getattr(m, "inplace", False))
    if node.op in ("call_method", "call_function"):
        return _name(node) in _VIEWS or inplace_kind(gm, node) is not None
    return False


def _family(gm: fx.GraphModule, x: fx.Node, op: fx.Node) -> set[fx.Node]:
    """`x` and every node that may share its memory (what it is a view of, and views of it),
    except the in-place `op` and what derives from it: those see the new value, as the graph says."""
    fam, todo = set(), [x]
    while todo:
        n = todo.pop()
        if n in fam or n is op:
            continue
        fam.add(n)
        if _is_view(gm, n) and n.args and isinstance(n.args[0], fx.Node):
            todo.append(n.args[0])
        todo.extend(u for u in n.users if _is_view(gm, u) and u.args and u.args[0] is n)
    return fam


def _why_not(gm: fx.GraphModule, node: fx.Node, kind: str, x: fx.Node, fam: set[fx.Node],
             sites: dict[str, list[fx.Node]]) -> str | None:
    """Why rewriting `node` out of place would not be exact (None: it would be)."""
    if x.op == "placeholder":
        return f"{x.name!r} is an input of the model"
    if x.op == "get_attr":
        return f"{x.target!r} is a tensor of the model"
    if len(fam) > 1:
        other = sorted(n.name for n in fam if n is not x)[0]
        return f"{x.name!r} shares its memory with {other!r}"
    dt = x.meta.get("dtype")
    others = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
    if any(a.meta.get("dtype") not in (None, dt) for a in others):
        return "its operands have different dtypes"
    if kind == "method" and not hasattr(torch.Tensor, node.target[:-1]):
        return f"there is no out-of-place Tensor.{node.target[:-1]}"
    if kind == "function" and _out_of_place_function(node.target) is None:
        return f"there is no out-of-place {node.target.__name__[:-1]}"
    if kind == "module" and len(sites[str(node.target)]) > 1:
        return f"module {node.target!r} is called at {len(sites[str(node.target)])} places"
    return None


def _out_of_place_function(fn: Any) -> Any:
    """torch.relu_ -> torch.relu, F.elu_ -> F.elu (None where there is none)."""
    space = torch if getattr(torch, fn.__name__, None) is fn else F
    return getattr(space, fn.__name__[:-1], None)


def _rewrite(gm: fx.GraphModule, node: fx.Node, kind: str) -> None:
    if kind == "method":
        node.target = node.target[:-1]
    elif kind == "operator":
        node.target = IN_PLACE_OPERATORS[node.target]
    elif kind == "function":
        node.target = _out_of_place_function(node.target)
    elif kind == "flag":
        bound = inplace_flag(node.target, node)
        bound.arguments["inplace"] = False
        node.args, node.kwargs = tuple(bound.args), dict(bound.kwargs)
    else:
        submodule(gm, str(node.target)).inplace = False


def rewrite_inplace(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite, in `gm`'s graph, every in-place op whose input is read again later into its
    out-of-place form and point those later readers at its result; mark the ones that cannot be
    rewritten exactly with ``node.meta["inplace"]`` (a reason). Needs ``meta["dtype"]`` (shape
    annotation) for the dtype check; returns `gm`, recompiled when anything changed."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    sites: dict[str, list[fx.Node]] = {}
    for n in nodes:
        if n.op == "call_module":
            sites.setdefault(str(n.target), []).append(n)
    changed = False
    for node in nodes:
        kind = inplace_kind(gm, node)
        if kind is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        x = node.args[0]
        fam = _family(gm, x, node)
        later = sorted((u for a in fam for u in a.users if order[u] > order[node] and u is not node),
                       key=order.__getitem__)
        if not later:
            continue  # nobody reads the old value afterwards: in place or not, the graph is the same
        why = "an item assignment has no out-of-place form" if kind == "setitem" else \
            _why_not(gm, node, kind, x, fam, sites)
        if why is not None:
            node.meta["inplace"] = (f"{node.name!r} changes {x.name!r} in place, and {later[0].name!r} reads it "
                                    f"afterwards ({why})")
            continue
        _rewrite(gm, node, kind)
        for u in later:
            u.replace_input_with(x, node)
        changed = True
    if changed:
        gm.recompile()
    return gm
