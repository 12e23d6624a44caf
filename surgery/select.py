"""Selectors: which modules (and so which graph nodes) a pass touches.

A selector is one item or a tuple/list of items, each of which may be:

- an ``nn.Module`` subclass: ``nn.Conv2d`` matches every Conv2d (and subclasses);
- a string: a module class name (``"Conv2d"``) or a glob over qualified names
  (``"layer*.conv2"``, ``"features.*"``);
- a compiled regex: ``re.compile(r"layer[12]\\..*")`` searched in the qualified name;
- a callable ``(name, module) -> bool``.

``exclude`` takes the same forms and wins over ``select``.

Example::

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    >>> list(select_modules(net, nn.Conv2d, exclude="2"))
    ['0']
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Any, Callable, Iterable, Iterator, Union

import torch.fx as fx
from torch import nn

from .errors import SelectionError
from .graph import submodule

__all__ = ["Selector", "matches", "select_modules", "select_nodes", "describe"]

SelectorItem = Union[type, str, "re.Pattern[str]", Callable[[str, nn.Module], bool]]
Selector = Union[SelectorItem, tuple, list, None]


def _items(sel: Selector) -> list:
    if sel is None:
        return []
    if isinstance(sel, (tuple, list, set, frozenset)):
        return list(sel)
    return [sel]


def _check(item: Any, role: str) -> None:
    ok = (isinstance(item, type) and issubclass(item, nn.Module)) or isinstance(item, (str, re.Pattern)) \
        or (callable(item) and not isinstance(item, type))
    if not ok:
        raise SelectionError(f"{role}= entries must be module classes, names/globs, regexes or "
                             f"callables (name, module) -> bool; got {item!r}")


def _match_one(item: Any, name: str, module: nn.Module) -> bool:
    if isinstance(item, type):
        return isinstance(module, item)
    if isinstance(item, str):
        return type(module).__name__ == item or fnmatch.fnmatchcase(name, item)
    if isinstance(item, re.Pattern):
        return item.search(name) is not None
    return bool(item(name, module))


def matches(name: str, module: nn.Module, select: Selector, exclude: Selector = None) -> bool:
    """True when (name, module) is selected and not excluded. ``select=None`` selects all."""
    sel = _items(select)
    if sel and not any(_match_one(i, name, module) for i in sel):
        return False
    return not any(_match_one(i, name, module) for i in _items(exclude))


def describe(sel: Selector, empty: str = "everything") -> str:
    """A short human description of a selector, for messages."""
    parts = []
    for i in _items(sel):
        parts.append(i.__name__ if isinstance(i, type) else i.pattern if isinstance(i, re.Pattern)
                     else repr(i) if isinstance(i, str) else getattr(i, "__name__", repr(i)))
    return ", ".join(parts) or empty


def _nearest(root: nn.Module, select: Selector) -> list[str]:
    names = [n for n, _ in root.named_modules() if n]
    classes = sorted({type(m).__name__ for m in root.modules()})
    words = [i for i in _items(select) if isinstance(i, str)]
    words += [i.__name__ for i in _items(select) if isinstance(i, type)]
    words += [i.pattern for i in _items(select) if isinstance(i, re.Pattern)]
    near: list[str] = []
    for w in words:
        near += difflib.get_close_matches(w, names + classes, n=5, cutoff=0.3)
    if not near:
        near = names[:5] if names else classes[:5]
    return list(dict.fromkeys(near))[:8]


def select_modules(root: nn.Module, select: Selector = None, exclude: Selector = None, *,
                   required: bool = True) -> dict[str, nn.Module]:
    """The (name -> module) pairs of `root` picked by select/exclude, in definition order.

    Raises SelectionError (with the nearest names) when `required` and nothing matched.
    """
    for i in _items(select):
        _check(i, "select")
    for i in _items(exclude):
        _check(i, "exclude")
    picked = {n: m for n, m in root.named_modules() if n and matches(n, m, select, exclude)}
    if required and not picked:
        raise SelectionError(f"select={describe(select)} (exclude={describe(exclude, 'nothing')}) matched no module "
                             f"of {type(root).__name__}", _nearest(root, select))
    return picked


def _module_nodes(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, str, nn.Module]]:
    for node in gm.graph.nodes:
        if node.op == "call_module":
            yield node, str(node.target), submodule(gm, str(node.target))


def select_nodes(gm: fx.GraphModule, select: Selector = None, exclude: Selector = None, *,
                 required: bool = True, skip: Iterable[type] = ()) -> list[fx.Node]:
    """The ``call_module`` nodes of `gm` whose module is selected, in graph order.

    `skip` lists module classes never returned (e.g. mask modules a pass inserted itself).
    A selection that matches modules that are never called as graph nodes (inside an opaque
    module) is reported with those names.
    """
    for i in _items(select):
        _check(i, "select")
    for i in _items(exclude):
        _check(i, "exclude")
    skip = tuple(skip)
    nodes = [n for n, name, m in _module_nodes(gm)
             if not (skip and isinstance(m, skip)) and matches(name, m, select, exclude)]
    if required and not nodes:
        hidden = [n for n in select_modules(gm, select, exclude, required=False)]
        if hidden:
            raise SelectionError(f"select={describe(select)} matched only modules that are not graph nodes "
                                 f"(inside opaque modules or never called): {', '.join(hidden[:8])}")
        raise SelectionError(f"select={describe(select)} (exclude={describe(exclude, 'nothing')}) matched no module "
                             f"in the graph of {type(gm).__name__}", _nearest(gm, select))
    return nodes
