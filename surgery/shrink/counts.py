"""Counts that a model reads at run time and Shrink keeps read there: a count of copies computed
from a size the pruning changes is given a new divisor instead of becoming a constant, and a
reshape's size read from another tensor stays a run-time size (-1, or the count scaled)."""
from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from ..channels.checks import shape_read

__all__ = ["divide_anew", "size_at_run_time"]

NewShape = Callable[[fx.Node], "list[int] | None"]  # a node's shape after the cut (None: unchanged)


def _length_now(read: tuple[fx.Node, int] | None, new_shape: NewShape) -> int | None:
    """The length `read` gives on the example once the cut is made."""
    shape = read[0].meta.get("shape") if read is not None else None
    if not isinstance(shape, torch.Size) or not -len(shape) <= read[1] < len(shape):
        return None
    return int((new_shape(read[0]) or list(shape))[read[1]])


_ARITH = frozenset({operator.mul, operator.add, operator.sub, operator.floordiv, operator.truediv})
_ROUND = frozenset({math.ceil, math.floor})


def _value_now(n: Any, new_shape: NewShape, depth: int = 0) -> float | None:
    """The value a size expression (lengths read from shapes, numbers, + - * // /, ceil and floor:
    MobileViT's ``math.ceil(H / patch_h)``) has on the example once the cut is made; None for
    anything else."""
    if isinstance(n, (int, float)) and not isinstance(n, bool):
        return n
    if not isinstance(n, fx.Node) or depth > 8:
        return None
    if n.op == "call_function" and n.target in _ARITH and len(n.args) == 2 and not n.kwargs:
        a, b = (_value_now(x, new_shape, depth + 1) for x in n.args)
        if a is None or b is None or n.target in (operator.floordiv, operator.truediv) and b == 0:
            return None
        return n.target(a, b)
    if n.op == "call_function" and n.target in _ROUND and len(n.args) == 1 and not n.kwargs:
        a = _value_now(n.args[0], new_shape, depth + 1)
        return None if a is None else n.target(a)
    return _length_now(shape_read(n), new_shape)


def size_at_run_time(node: fx.Node, count: fx.Node, new: int, free: bool, new_shape: NewShape) -> int | fx.Node:
    """What sizes an axis of reshape `node` that `count`, read at run time, sized (new length
    `new` on the example). Where the axis holds the batch as well (HaloNet's B * heads), a
    literal would hold for the example's batch only (and the batch may be 1, the axis then the
    heads alone: timm's ``B * num_heads``). So -1, inferred from the shrunk input, where `free`
    (no other -1); else `count` scaled by new over its own value after the cut, where that follows
    from shapes and numbers (at batch B it is B times the example's share); else `new`."""
    if free and (node.op == "call_method" and node.target in ("view", "reshape") or node.target is torch.reshape):
        return -1
    now = _value_now(count, new_shape)
    if not now:
        return new
    if now == new:
        return count
    with node.graph.inserting_before(node):
        scaled = node.graph.call_function(operator.mul, (count, new))
        return node.graph.call_function(operator.floordiv, (scaled, now))


def divide_anew(count: fx.Node, want: int, new_shape: NewShape) -> bool:
    """`count` is ``t.size(d) // c``: make it `want` on the example by dividing by the new number
    of positions per block instead (DeBERTa's ``repeat(q.size(0) // heads, 1, 1)``, with heads
    pruned), so the count stays read at run time and other batch sizes repeat as before.
    `new_shape`: a node's shape after the cut (None: unchanged). False, with nothing changed,
    for any other expression."""
    if count.target is not operator.floordiv or not isinstance(count.args[1], int) or \
            not isinstance(count.args[0], fx.Node):
        return False
    read = count.args[0]
    n = _length_now(shape_read(read), new_shape)
    if n is None:
        return False
    if want <= 0 or n % want:
        return False
    count.args = (read, n // want)
    return True
