"""Which values of a concrete trace may steer Python (see :mod:`surgery.concrete`): those that
follow from tensor sizes alone. A size is not always one: a tensor selected by its data
(``scores[scores > t]``, ``torch.where(keep)``, ``nonzero``, ``nms``) has as many entries as the
data let through, so its length is data too. A guard on it (``if boxes.numel() == 0``) would make
a detector's graph fail on every image that lets a different number of boxes through; refused, the
code that asks stays eager, as any branch on data does.
"""
from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
import torch.fx as fx

from .trace_effects import proxies_in

__all__ = ["from_sizes", "shaped_by_data"]

_SELECTING = frozenset({"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere", "nms", "batched_nms"})


def shaped_by_data(kind: str, target: Any, args: tuple, kwargs: dict, by_data: set) -> bool:
    """Whether a node's value has a length set by tensor data: a selection by data (see the module
    docstring), or anything computed from one."""
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    found = proxies_in(args, kwargs)
    if any(p.node in by_data for p in found):
        return True
    if name in _SELECTING or target is torch.where and len(args) == 1 and not kwargs:
        return True
    if target is operator.getitem and len(args) > 1 and found:  # x[mask]: a boolean index
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        value_of = found[0].tracer.value_of
        return any(isinstance(i, fx.Proxy) and getattr(value_of(i), "dtype", None) is torch.bool for i in index)
    return False


def from_sizes(kind: str, target: Any, args: tuple, kwargs: dict, value: Any, sized: set, by_data: set) -> bool:
    """Whether a node's value follows from tensor sizes (and constants) alone: only such values
    may steer Python, behind a guard. A value read from tensor data (``if mask.any()``), or the
    size of a tensor selected by data, may not: a guard on it would make the graph fail on most
    other inputs, so fx's refusal stands."""
    if isinstance(value, torch.Tensor) or kind == "placeholder":  # an input is data, even a Python bool
        return False
    if kind == "call_function" and target is getattr and len(args) > 1 and args[1] == "shape" or \
            kind == "call_method" and target in ("size", "numel", "dim") or \
            kind == "call_function" and target is builtins.len:
        return not (isinstance(args[0], fx.Proxy) and args[0].node in by_data) or \
            kind == "call_method" and target == "dim"
    return all(p.node in sized for p in proxies_in(args, kwargs))
