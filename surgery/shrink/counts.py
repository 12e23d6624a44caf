"""Counts that a model reads at run time and Shrink keeps read there: a count of copies computed
from a size the pruning changes is given a new divisor instead of becoming a constant."""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

__all__ = ["divide_anew"]


def divide_anew(count: fx.Node, want: int, new_shape: Callable[[fx.Node], list[int] | None]) -> bool:
    """`count` is ``t.size(d) // c``: make it `want` on the example by dividing by the new number
    of positions per block instead (DeBERTa's ``repeat(q.size(0) // heads, 1, 1)``, with heads
    pruned), so the count stays read at run time and other batch sizes repeat as before.
    `new_shape`: a node's shape after the cut (None: unchanged). False, with nothing changed,
    for any other expression."""
    if count.target is not operator.floordiv or not isinstance(count.args[1], int) or \
            not isinstance(count.args[0], fx.Node):
        return False
    read = count.args[0]
    if read.op == "call_method" and read.target == "size" and len(read.args) == 2:
        tensor, d = read.args
    elif read.target is operator.getitem and isinstance(read.args[0], fx.Node) and \
            (read.args[0].target == "size" or read.args[0].target is getattr and read.args[0].args[1] == "shape"):
        tensor, d = read.args[0].args[0], read.args[1]
    else:
        return False
    shape = tensor.meta.get("shape") if isinstance(tensor, fx.Node) else None
    if not isinstance(d, int) or not isinstance(shape, torch.Size):
        return False
    n = (new_shape(tensor) or list(shape))[d]
    if want <= 0 or n % want:
        return False
    count.args = (read, n // want)
    return True
