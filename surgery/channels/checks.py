"""Checks after the walk that freeze what the rules cannot vouch for: a channel count read as a
number (a tensor with a use no rule followed is :mod:`.held`'s).
"""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from .rulebook import varying

if TYPE_CHECKING:
    from .groups import ChannelGraph

__all__ = ["check_sizes", "size_uses", "shape_read"]


def check_sizes(cg: ChannelGraph) -> None:
    """A channel count read with size()/shape may only size the axes of reshapes, and only an
    axis that carries the same channels: a reshape of that very tensor (a channel shuffle's
    ``x.view(b, g, c // g, h, w)``), or one whose axis the count sizes directly (MaxViT's
    ``out.reshape(B, G, P, D)`` with D read from its input): that axis is coupled to the channels
    counted, so both keep the same number. Anything else (a scale computed from the count, a
    count that sizes an axis of other channels after arithmetic) would change when channels go:
    the channels stay."""
    for size_node, tensor in cg.size_nodes:
        _batch_in_channel_axes(cg, size_node, tensor)
        fixes: list[int] = []
        bad, pairs = size_uses(cg, size_node, fixes, cg.decoupled)
        for axis in fixes:
            cg.fixed.append((cg.layouts[tensor], axis, f"the length of axis {axis} of {tensor.name!r} (read by "
                             f"{size_node.name!r}) sizes an axis that carries no channels"))
        if bad is not None:
            ids = cg.layouts.get(tensor)
            cg.frozen.append((np.unique(ids), f"node {bad.name!r} uses the channel count of "
                                f"{tensor.name!r} (read by {size_node.name!r}) as a number"))
            continue
        for a, b in pairs:
            cg.edges.append((a, b))


def _reads_whole_shape(size_node: fx.Node) -> bool:
    """Whether a size read gives the whole shape (``x.shape``, ``x.size()``), not one length."""
    return size_node.op == "call_function" or size_node.target == "size" and len(size_node.args) < 2 \
        and "dim" not in size_node.kwargs


def _batch_in_channel_axes(cg: ChannelGraph, size_node: fx.Node, tensor: fx.Node) -> None:
    """A length read from axis 0 of a tensor that holds no channels there (its batch) which,
    multiplied (``B * num_heads``: timm's HaloNet merges heads into the batch), sizes a reshape's
    axis along which channels vary: that axis holds the batch as well, so those channels stay.
    An example of batch 1 cannot tell them from the batch, and a mask on that axis would then hold
    for batch 1 only; with a larger batch the channels could not go either."""
    lay = cg.layouts.get(tensor)
    if not isinstance(lay, np.ndarray) or 0 in varying(lay):
        return
    if _reads_whole_shape(size_node):
        reads = [u for u in size_node.users if u.target is operator.getitem and u.args[1] == 0]
    else:
        d = size_node.args[1] if len(size_node.args) > 1 else size_node.kwargs.get("dim")
        reads = [size_node] if isinstance(d, int) and d % lay.ndim == 0 else []
    frontier = [(r, False, False) for r in reads]
    seen: set[fx.Node] = set()
    while frontier:
        node, scaled, counted = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        for u in node.users:
            if u.op == "call_function" and u.target is operator.mul:
                frontier.append((u, True, counted or any(_counts(a, tensor, lay) for a in u.args if a is not node)))
            elif scaled and not counted and _is_shape_arg_use(u, node) and \
                    isinstance(out := cg.layouts.get(u), np.ndarray):
                sizes = _sizes(u)
                for k in (k for k, a in enumerate(sizes) if a is node and len(sizes) == out.ndim):
                    if out.shape[k] > 1:
                        cg.fixed.append((out, k, f"{u.name!r} sizes axis {k} with {node.name!r}, the batch "
                                                 f"read from {tensor.name!r} times a count: the axis holds both"))


def _counts(n: Any, tensor: fx.Node, lay: np.ndarray) -> bool:
    """Whether `n` is a product with a factor that reads, at run time, the length of an axis of
    `tensor` that channels vary along (``B * C * nh``, C from ``x.shape``: MobileViT's unfold).
    Such an axis holds the batch outermost and every channel in each sample, and a reshape sized
    so keeps its length in step with the channels: it is read anew once they go."""
    if isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.mul:
        return any(_counts(a, tensor, lay) for a in n.args)
    read = shape_read(n)
    return read is not None and read[0] is tensor and isinstance(read[1], int) and read[1] % lay.ndim in varying(lay)


_ARITH = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
          operator.neg, operator.pow}


def _line(lay: np.ndarray, axis: int) -> np.ndarray | None:
    """The elements of layout `lay` along `axis` (None when it does not vary there)."""
    if axis >= lay.ndim or lay.shape[axis] == 1:
        return None
    return np.moveaxis(lay, axis, 0).reshape(lay.shape[axis], -1)[:, 0]


def _sizes(u: fx.Node) -> list:
    """The size arguments of a reshape call `u`, one per output axis when they are listed."""
    rest = list(u.args[1:]) or list(u.kwargs.get("shape", ()) or u.kwargs.get("size", ()))
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest


def size_uses(g, size_node: fx.Node, fixes: list[int] | None = None, decoupled: list | None = None
              ) -> tuple[fx.Node | None, list[tuple[np.ndarray, np.ndarray]]]:
    """(None, couplings) when every use of a size read sizes reshapes as :func:`check_sizes`
    allows, with the element pairs to couple; else (the offending node, []).

    With `fixes`, a tensor whose channels vary along several axes (heads and head dimensions)
    may have one of them read to size an axis that carries no channels (HF's
    ``attn.reshape(B, -1, T, v.shape[-1])``): that axis is appended to `fixes`, to stay whole.

    With `decoupled`, a count (or a number computed from it, timm's ``C // num_heads``) that sizes
    one axis of a reshape of another tensor, as one of its arguments (MaxViT's
    ``out.reshape(B, G, P, D)`` with D read from its input), ties nothing: (reshape node, argument
    index) is appended, and Shrink writes that axis' own size there, so the two widths may differ."""
    tensor = size_node.args[0]
    lay = g.layouts.get(tensor)
    vary = set(varying(lay)) if lay is not None else set()
    whole = _reads_whole_shape(size_node)
    if size_node.target == "numel":
        return (None, []) if not vary else (next(iter(size_node.users), size_node), [])
    if not whole:
        d = size_node.args[1] if len(size_node.args) > 1 else size_node.kwargs["dim"]
        if d % lay.ndim not in vary:
            return None, []
    # each node reached: the dims of the shape it holds (a tuple), or (None, axis) for one count:
    # the axis it is, or None once arithmetic made something else of it
    start = (list(range(lay.ndim)), None) if whole else (None, d % lay.ndim)
    # (and the axis read first, kept through arithmetic)
    frontier: list[tuple[fx.Node, list[int] | None, int | None, int | None]] = [(size_node, *start, start[1])]
    packed: set[fx.Node] = set()  # shapes made at run time with the count somewhere inside
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    seen = set()
    scale: dict[fx.Node, int] = {}
    while frontier:
        node, dims, axis, read = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        for u in node.users:
            if dims is not None and u.op == "call_function" and u.target is operator.getitem:
                k = u.args[1]
                if isinstance(k, slice):  # x.shape[:-1]: a tuple of some of the dims
                    part = dims[k]
                    if vary & set(part):
                        frontier.append((u, part, None, None))
                    continue
                if isinstance(k, int) and dims[k] not in vary:
                    continue
                frontier.append((u, None, *(2 * [dims[k] if isinstance(k, int) else None])))
            elif u.op == "call_function" and u.target is operator.add and \
                    any(isinstance(a, tuple) and node in a for a in u.args):
                frontier.append((u, None, axis, read))  # (-1,) + shape[1:] + (x.size(-1),): the count, in a shape
                packed.add(u)
            elif axis is not None and u.target is operator.mul and len(u.args) == 2 and \
                    isinstance(k := u.args[1] if u.args[0] is node else u.args[0], int) and k > 0:
                scale[u] = scale.get(node, 1) * k  # heads * n_rep (repeat_kv): the count, repeated
                frontier.append((u, None, axis, read))
            elif u.op == "call_function" and u.target in _ARITH:
                frontier.append((u, None, None, read))
            elif axis is not None and (same := _asserted_equal(g, u, node, lay, axis)) is not None:
                if len(same):
                    pairs.append(same)
            elif (a := _normalised_count(g, u, node, lay, axis, dims)) is not None:
                if not a:
                    return u, []
            elif fixes is not None and len(vary) > 1 and read is not None and u.target is operator.getitem \
                    and u.args[0] is tensor:
                fixes.append(read)  # x[..., :x.shape[-1] // 2]: the getitem rule keeps that axis whole
            elif _is_shape_arg_use(u, node):
                out = g.layouts.get(u)
                sizes = _sizes(u)
                if u.args[0] is tensor:  # reshaping the tensor counted: the count is its own, but a number
                    # computed from it (Conditional DETR's ``C // heads`` beside a written ``heads``) stays
                    # right only while the tensor's other axes keep their lengths
                    if axis is None and read is not None and isinstance(out, np.ndarray) and node in sizes:
                        k = sizes.index(node) % out.ndim
                        g.fixed.extend((out, j, f"{u.name!r} sizes axis {k} of {tensor.name!r} with "
                                                f"{node.name!r}, a number computed from its channel count")
                                       for j in varying(out) if j != k)
                    continue
                if axis is not None and node in sizes and isinstance(out, np.ndarray) and u.target == "expand" and \
                        (a := _line(lay, axis)) is not None and np.array_equal(a, _line(out, sizes.index(node))):
                    continue  # expands a tensor along these very channels (gather_rule's index): both shrink alike
                if decoupled is not None and dims is None and node not in packed and sizes.count(node) == 1:
                    decoupled.append((u, sizes.index(node)))  # the count, or a number made from it (C // heads)
                    continue
                if dims is not None and sizes == [node]:  # x.view(y.shape)
                    slots = list(enumerate(dims))
                elif axis is not None and node in sizes and node not in packed:
                    slots = [(sizes.index(node), axis)]
                elif axis is not None and isinstance(out, np.ndarray):
                    # inside a shape made at run time: the one axis of the result that is that long
                    a = _line(lay, axis)
                    fits = [j for j in range(out.ndim) if (b := _line(out, j)) is not None and len(b) == len(a)]
                    if len(fits) != 1:
                        return u, []
                    slots = [(fits[0], axis)]
                else:
                    return u, []
                for j, d_read in slots:
                    a, b = _line(lay, d_read), _line(out, j) if isinstance(out, np.ndarray) else None
                    if a is None:
                        continue
                    if b is None and fixes is not None and len(vary) > 1 and u.meta.get("shape") is not None \
                            and u.meta["shape"][j] == len(a):
                        fixes.append(d_read)
                        continue
                    if node in scale and b is not None and len(b) == len(a) * scale[node]:
                        blocks = b.reshape(len(a), scale[node])  # each entry repeated (heads -> their copies)
                        if not (blocks == blocks[:, :1]).all():
                            return u, []
                        b = blocks[:, 0]
                    if b is None or len(a) != len(b):
                        return u, []
                    if not np.array_equal(np.sort(a), np.sort(b)):  # the same channels, maybe shuffled: nothing to tie
                        pairs.append((a, b))
            elif fixes is not None and len(vary) > 1 and read is not None:
                fixes.append(read)  # one axis of several, used as a number (DeBERTa's sqrt(head size)): kept whole
            else:
                return u, []
    return None, pairs


_NORM_FUNCTIONS = tuple(f for f in (F.layer_norm, getattr(F, "rms_norm", None)) if f is not None)


def _normalised_count(g, u: fx.Node, node: fx.Node, lay: np.ndarray, axis: int | None, dims: list | None
                      ) -> bool | None:
    """Where `u` is ``F.layer_norm``/``F.rms_norm`` given the count `node` as its normalised shape
    (``(x.shape[-1],)``, ``x.shape[-1:]``): whether it counts the very channels the norm reads
    over its last axis (the norm's rule has Shrink rewrite the call with its original width, so
    the count goes with it); None for any other use."""
    if u.op != "call_function" or u.target not in _NORM_FUNCTIONS:
        return None
    shape = u.args[1] if len(u.args) > 1 else u.kwargs.get("normalized_shape")
    if axis is not None and isinstance(shape, (tuple, list)) and list(shape) == [node]:
        read = axis
    elif dims is not None and shape is node and len(dims) == 1:
        read = dims[0]
    else:
        return None
    x_lay = g.layouts.get(u.args[0])
    a, b = _line(lay, read), _line(x_lay, x_lay.ndim - 1) if isinstance(x_lay, np.ndarray) else None
    return a is not None and b is not None and np.array_equal(np.sort(a), np.sort(b))


def shape_read(n: Any) -> tuple[fx.Node, int] | None:
    """(tensor, axis) where `n` reads one length of a tensor: ``t.shape[a]``, ``t.size()[a]`` or
    ``t.size(a)``."""
    if not isinstance(n, fx.Node):
        return None
    if n.op == "call_method" and n.target == "size" and len(n.args) == 2 and isinstance(n.args[0], fx.Node):
        tensor, d = n.args
    elif n.target is operator.getitem and isinstance(whole := n.args[0], fx.Node) and \
            (whole.target == "size" or whole.target is getattr and whole.args[1] == "shape") and \
            isinstance(whole.args[0], fx.Node):
        tensor, d = whole.args[0], n.args[1]
    else:
        return None
    return (tensor, d) if isinstance(d, int) else None


def _asserted_equal(g, u: fx.Node, node: fx.Node, lay: np.ndarray, axis: int) -> tuple | None:
    """Where `u` compares the count `node` (of `lay`'s `axis`) for equality with another tensor's
    count of as many channels, only to assert it (timm's GCViT: ``_assert(x.shape[-1] ==
    q.shape[-1])``): the element pairs that keep the two counts equal (empty where they count the
    same channels); None for any other use."""
    if u.op != "call_function" or u.target not in (operator.eq, operator.ne) or len(u.args) != 2 or \
            not u.users or any(w.target is not torch._assert for w in u.users):
        return None
    other = shape_read(u.args[1] if u.args[0] is node else u.args[0])
    lay_other = g.layouts.get(other[0]) if other is not None else None
    a = _line(lay, axis)
    b = _line(lay_other, other[1] % lay_other.ndim) if isinstance(lay_other, np.ndarray) else None
    if a is None or b is None or len(a) != len(b):
        return None
    return () if np.array_equal(np.sort(a), np.sort(b)) else (a, b)


def _is_shape_arg_use(u: fx.Node, v: fx.Node) -> bool:
    if u.op == "call_method" and u.target in ("view", "reshape", "expand", "repeat") and u.args and u.args[0] is not v:
        return True
    if u.op == "call_function" and u.target is torch.reshape and u.args and u.args[0] is not v:
        return True
    return False
