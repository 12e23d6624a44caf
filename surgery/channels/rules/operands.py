"""Tensors the rules do not track, met in an element-wise op with tracked channels: a parameter
of the model read through ``get_attr`` (a per-channel scale, a class token, a position table,
a relative position bias gathered per token pair) is cut with the channels, along the axis
:func:`_param_axis` follows op by op; anything else keeps the channels whole
(:func:`untracked_operand`)."""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..rulebook import RuleContext, varying
from .common import _owner, _reshape

_ELEMENTWISE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub,
                torch.mul, "add", "sub", "mul", "div", "float", "to", "type_as", "neg", "__radd__", "__rsub__",
                "__rmul__"}


_VIEWS = {"reshape", "view", "unsqueeze", "expand", torch.reshape, torch.unsqueeze}
_MOVES = {"permute", "transpose", "contiguous", torch.permute, torch.transpose}


def _param_source(t: fx.Node) -> fx.Node | None:
    """The get_attr that `t` is, or is computed from element by element with numbers (Gemma's
    ``1.0 + weight``, a ``weight.float()``), reshaped or permuted from (ConvNeXt's
    ``gamma.reshape(1, -1, 1, 1)``), or gathered from by rows (a relative position bias
    ``table[index].view(N, N, -1).permute(2, 0, 1)``): cutting that tensor cuts `t` alike
    (:func:`_param_axis` says along which axis). Else None."""
    while t.op != "get_attr":
        if t.op not in ("call_function", "call_method") or t.kwargs or \
                t.target not in _ELEMENTWISE | _VIEWS | _MOVES and t.target is not operator.getitem:
            return None
        if (t.target in _VIEWS | _MOVES or t.target is operator.getitem) and isinstance(t.args[0], fx.Node):
            t = t.args[0]  # the other arguments are sizes (x.shape[0]), axes or an index
            continue
        if len(t.all_input_nodes) != 1:
            return None
        t = t.all_input_nodes[0]
    return t


# element-wise functions of one tensor: a per-channel tensor computed from the model's own
# (a frozen BatchNorm's ``weight * (running_var + eps).rsqrt()``) is cut where they are
_UNARY = {"rsqrt", "sqrt", "exp", "abs", "reciprocal", "sigmoid", "tanh", torch.rsqrt, torch.sqrt, torch.exp,
          torch.abs, torch.reciprocal, torch.sigmoid, torch.tanh}
_CATS = {torch.cat, torch.concat}
# ops that resample a tensor over some axes, each position of the others alone -> those others
# (the first two: batch and channels, for torch's); the axes they resize vary along no axis of
# the source that `_axes_after` can name (``_MIXED``)
_RESAMPLE: dict[Any, tuple[int, ...]] = {F.interpolate: (0, 1), F.adaptive_avg_pool1d: (0, 1),
                                         F.adaptive_avg_pool2d: (0, 1), F.avg_pool1d: (0, 1), F.avg_pool2d: (0, 1)}
# timm's position-table resampling (``dynamic_img_size=True``), wrapped as one call: by name, so
# that timm is not imported for it
_RESAMPLE_NAMED = {("timm.layers.pos_embed", "resample_abs_pos_embed"): (0, -1),
                   ("timm.layers.pos_embed", "resample_abs_pos_embed_nhwc"): (0, -1),
                   ("timm.models.qwen3_vit", "resample_pos_embed_grid"): (0, -1)}
# a table read by rows through a matrix of weights over them (Gemma-4's ``one_hot(pos) @ table``):
# the table's last axis is the result's; and sums over other axes (of several such tables)
_MATMULS = {operator.matmul, torch.matmul}
_SUMS = {"sum", torch.sum}
_MIXED = "mixed"
_FLATTEN = {"flatten", torch.flatten}


def _resampled(target: Any) -> tuple[int, ...] | None:
    """The axes a resampling op (:data:`_RESAMPLE`) keeps position by position, or None."""
    if callable(target):
        kept = _RESAMPLE.get(target)
        return kept if kept is not None else _RESAMPLE_NAMED.get(
            (getattr(target, "__module__", None), getattr(target, "__qualname__", None)))
    return None


def _param_tree(t: fx.Node) -> list[tuple[fx.Node, list[fx.Node]]] | None:
    """The get_attrs `t` is computed from element by element (with broadcasting), through views,
    permutes, flattens, basic indexing, joins (``cat``) and resampling (:func:`_resampled`), each
    with its chain of ops as :func:`_chain` gives one: a frozen BatchNorm's ``bias - running_mean *
    (weight * (running_var + eps).rsqrt())`` is cut where its four buffers are, a position table
    resized to the image where the table is. Else None (an op of another kind, or an input that is
    not the model's)."""
    pairs: list[tuple[fx.Node, list[fx.Node]]] = []
    todo: list[tuple[fx.Node, list[fx.Node]]] = [(t, [])]
    while todo:
        n, after = todo.pop()
        if n.op == "get_attr":
            pairs.append((n, after[::-1]))
            continue
        if n.op not in ("call_function", "call_method"):
            return None
        if _resampled(n.target) is not None:  # a table resized over its spatial axes (YOLOS's, Dinov2's)
            sizes: list[fx.Node] = []
            fx.node.map_arg((n.args[1:], n.kwargs), sizes.append)
            if not isinstance(n.args[0], fx.Node) or any(isinstance(a.meta.get("shape"), torch.Size) for a in sizes):
                return None  # the other arguments are sizes and options, not tensors
            todo.append((n.args[0], after + [n]))
            continue
        if any(isinstance(v, fx.Node) for v in n.kwargs.values()):
            return None
        if n.target in _CATS:  # parts of one table joined along another axis
            parts = n.args[0]
            if not isinstance(parts, (list, tuple)) or not all(isinstance(a, fx.Node) for a in parts):
                return None
            todo.extend((a, after + [n]) for a in parts)
        elif n.target in _VIEWS | _MOVES | _FLATTEN or n.target is operator.getitem:
            idx = n.args[1] if n.target is operator.getitem and len(n.args) > 1 else ()
            if any(isinstance(i, fx.Node) for i in (idx if isinstance(idx, tuple) else (idx,))) or \
                    not isinstance(n.args[0], fx.Node):
                return None  # rows gathered by an index: :func:`_param_source`'s single chains only
            todo.append((n.args[0], after + [n]))
        elif n.target in ("to", "type_as") and isinstance(n.args[0], fx.Node):
            todo.append((n.args[0], after + [n]))  # another tensor there gives a dtype or device only
        elif n.target in _ELEMENTWISE | _UNARY and n.all_input_nodes:
            todo.extend((a, after + [n]) for a in n.all_input_nodes)
        elif n.target in _MATMULS and len(n.args) == 2 and isinstance(n.args[1], fx.Node) and \
                len(n.args[1].meta.get("shape") or ()) >= 2:
            todo.append((n.args[1], after + [n]))  # the row weights carry no channels: the table's pass
        elif n.target in _SUMS and isinstance(n.args[0], fx.Node) and _summed_axes(n) is not None:
            todo.append((n.args[0], after + [n]))
        else:
            return None
    return pairs


def _summed_axes(n: fx.Node) -> tuple[tuple[int, ...], bool] | None:
    """(the axes ``x.sum(dims)`` sums over, keepdim), or None for a sum over all of them."""
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    shape = n.args[0].meta.get("shape") if isinstance(n.args[0], fx.Node) else None
    if dims is None or not isinstance(shape, torch.Size):
        return None
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(d % len(shape) for d in dims), bool(n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False))


def _tree_axes(t: fx.Node, axis: int) -> list[tuple[fx.Node, list[fx.Node], int]] | None:
    """The parameters to cut along which of their axes when `t`, computed from several of them
    (:func:`_param_tree`), loses channels along `axis`: those constant along it are left whole.
    None where some source's axis cannot be followed."""
    tree = _param_tree(t)
    out = t.meta.get("shape")
    if not tree or not isinstance(out, torch.Size):
        return None
    cuts = []
    for source, chain in tree:
        src = source.meta.get("shape")
        if not isinstance(src, torch.Size):
            return None
        axes = _axes_after(list(range(len(src))), src, chain, mixed=True)
        if axes is None or len(axes) != len(out):
            return None
        a = axes[axis]
        if a == _MIXED:
            return None
        if a is None or src[a] == 1:
            continue  # constant along the channels' axis (broadcast, or a new axis)
        if src[a] != out[axis]:
            return None
        cuts.append((source, chain, a))
    return cuts or None


def _chain(source: fx.Node, t: fx.Node) -> list[fx.Node]:
    """The ops from `source` (exclusive) to `t` (inclusive), in order, as :func:`_param_source`
    walked them."""
    chain, n = [], t
    while n is not source:
        chain.append(n)
        n = n.args[0] if n.target in _VIEWS | _MOVES or n.target is operator.getitem else n.all_input_nodes[0]
    return chain[::-1]


def _param_axis(source: fx.Node, t: fx.Node, axis: int) -> int | None:
    """The axis of `source` (a get_attr) that axis `axis` of `t`, computed from it, runs along,
    followed op by op (:func:`_axes_after`); failing that, the same axis when no view changed
    its shape, else its one axis longer than 1."""
    src, out = source.meta.get("shape"), t.meta.get("shape")
    if not isinstance(src, torch.Size) or not isinstance(out, torch.Size):
        return None
    axes = _axes_after(list(range(len(src))), src, _chain(source, t))
    if axes is not None and axis < len(axes) and axes[axis] is not None and src[axes[axis]] == out[axis]:
        return axes[axis]
    if src == out or len(src) == len(out) and all(s in (1, o) for s, o in zip(src, out)) and src[axis] == out[axis]:
        return axis  # unchanged, or expanded along other axes (a class token per batch entry)
    long = [d for d, n in enumerate(src) if n > 1]
    return long[0] if len(long) == 1 and [n for n in out if n > 1] == [src[long[0]]] else None


def _axes_indexed(axes: list, idx: tuple) -> list | None:
    """`axes` after basic indexing by `idx` (slices, ints, None, one Ellipsis): an int drops its
    axis, None adds one, a slice keeps it (shorter, maybe: :func:`_param_axis` compares lengths)."""
    if sum(i is Ellipsis for i in idx) > 1:
        return None
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        named = sum(i is not None for i in idx if i is not Ellipsis)
        idx = idx[:k] + (slice(None),) * (len(axes) - named) + idx[k + 1:]
    out, k = [], 0
    for i in idx:
        if i is None:
            out.append(None)
            continue
        if k >= len(axes):
            return None
        if isinstance(i, slice):
            out.append(axes[k])
        k += 1
    return out + axes[k:]


def _axes_after(axes: list, shape: tuple, chain: list[fx.Node], mixed: bool = False) -> list | None:
    """For each axis of the result of `chain` (ops applied in turn to a tensor of `shape` whose
    axis k runs along source axis ``axes[k]``, or None), the source axis it runs along. With
    `mixed`, an axis that a view spreads over several (YOLOS's positions viewed as a grid) makes
    each of them ``_MIXED``, as resampling ops do, instead of ending the walk."""
    for n in chain:
        new = n.meta.get("shape")
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        if not isinstance(new, torch.Size):
            return None
        if n.target is operator.getitem:
            idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
            if all(isinstance(i, (slice, int)) or i is None or i is Ellipsis for i in idx):
                axes = _axes_indexed(axes, idx)  # basic indexing (a position table cut to a length)
                if axes is None:
                    return None
            elif not isinstance(idx[0], fx.Node) or len(idx) != 1 or \
                    not isinstance(idx[0].meta.get("shape"), torch.Size):
                return None  # only rows gathered by one index tensor: its axes, then the rest
            else:
                axes = [None] * len(idx[0].meta["shape"]) + axes[1:]
        elif name in ("permute", "transpose"):
            rest = [a for a in n.args[1:]]
            if name == "permute":
                perm = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
            else:
                perm = list(range(len(axes)))
                i, j = rest[0] % len(axes), rest[1] % len(axes)
                perm[i], perm[j] = perm[j], perm[i]
            axes = [axes[p % len(axes)] for p in perm]
        elif name in ("view", "reshape", "unsqueeze"):
            out: list = [None] * len(new)
            for k, a in enumerate(axes):  # an axis survives a reshape when it is one output axis alone
                if a is None or shape[k] == 1:
                    continue
                lay = np.arange(shape[k]).reshape([shape[k] if d == k else 1 for d in range(len(shape))])
                moved = _reshape(lay, tuple(shape), tuple(new))
                if moved is not None and mixed and len(varying(moved)) > 1:
                    for d in varying(moved):
                        out[d] = _MIXED
                    continue
                if moved is None or len(varying(moved)) != 1:
                    return None
                out[varying(moved)[0]] = a
            axes = out
        elif name == "expand" and len(new) > len(axes):  # new axes go in front (CLIP's class embedding)
            axes = [None] * (len(new) - len(axes)) + axes
        elif (kept := _resampled(n.target)) is not None and len(new) == len(axes):
            kept = {k % len(axes) for k in kept}
            axes = [a if k in kept else _MIXED for k, a in enumerate(axes)]
        elif n.target in _CATS and len(new) == len(axes):
            pass  # every axis runs as it did; the joined one is longer
        elif n.target in _MATMULS and len(axes) >= 2 and n.args[1] is not n.args[0]:
            # the table is the right operand (_param_tree follows no other): its last axis stays
            # last, its rows are contracted, its batch axes align from the right before them
            batch = [a if shape[k] == new[len(new) - len(axes) + k] else None for k, a in enumerate(axes[:-2])]
            axes = [None] * (len(new) - len(axes)) + batch + [None, axes[-1]]
        elif n.target in _SUMS and (summed := _summed_axes(n)) is not None:
            dims, keep = summed
            axes = [None if k in dims else a for k, a in enumerate(axes) if keep or k not in dims]
        elif name == "flatten":
            start, end = (list(n.args[1:]) + [0, -1][len(n.args) - 1:])[:2]
            start, end = start % len(axes), end % len(axes)
            merged = [a for k, a in enumerate(axes[start:end + 1], start) if shape[k] != 1]
            axes = axes[:start] + [merged[0] if len(merged) == 1 else _MIXED if merged else None] + axes[end + 1:]
        elif n.target in _ELEMENTWISE | _UNARY and len(new) >= len(axes):
            # broadcast with another operand: new axes in front, and an axis of length 1 widened
            # to the other's length is constant along it
            lead = len(new) - len(axes)
            axes = [None] * lead + [None if shape[k] == 1 and new[lead + k] != 1 else a for k, a in enumerate(axes)]
        elif len(new) != len(axes):
            return None
        shape = tuple(new)
    return axes


def _sized_on_the_way(ctx: RuleContext, source: fx.Node, chain: list[fx.Node], axis: int, line: np.ndarray
                      ) -> None:
    """The parameter `source` loses channels `line` along `axis` on its way (`chain`, as
    :func:`_chain` gives it): a view or reshape on that way with the length written in (timm's
    ``table[index].view(N, N, heads)``, a scale's ``gamma.view(C, 1, 1)``) gets the channels'
    layout, so Shrink rewrites that length."""
    src = source.meta.get("shape")
    for i, n in enumerate(chain):
        if not (n.op == "call_method" and n.target in ("view", "reshape") or n.target is torch.reshape):
            continue
        axes = _axes_after(list(range(len(src))), src, chain[:i + 1], mixed=True)
        shape = n.meta.get("shape")
        if axes is None or axis not in axes or not isinstance(shape, torch.Size) or n in ctx.g.layouts:
            continue
        k = axes.index(axis)
        if shape[k] == len(line):
            ctx.g.layouts[n] = line.reshape([len(line) if d == k else 1 for d in range(len(shape))])
            ctx.g.rewrite.add(n)


def untracked_operand(ctx: RuleContext, t: Any, tracked: np.ndarray | None, nd: int) -> None:
    """An element-wise op combines channels (layout `tracked`, `nd` axes) with an untracked tensor
    `t`. Where `t` varies along an axis the channels vary along, removing a channel would need `t`
    sliced too: a parameter of the model is (a per-channel scale read through get_attr); a table
    that varies along some of the channels' axes only (rotary tables along each head's dimensions)
    keeps those axes whole; anything else freezes the channels."""
    if tracked is None or not isinstance(t, fx.Node):
        return
    ts = ctx.shape(t)
    if ts is None:
        return
    full = (1,) * (nd - len(ts)) + tuple(ts)
    clash = [d for d in varying(tracked) if full[d] > 1]
    if not clash:
        return
    source = _param_source(t)
    axis = _param_axis(source, t, clash[0] - (nd - len(ts))) if source is not None and len(clash) == 1 else None
    cuts = [(source, _chain(source, t), axis)] if axis is not None else None
    if cuts is None and source is None and len(clash) == 1:
        cuts = _tree_axes(t, clash[0] - (nd - len(ts)))
    if cuts is not None and len(varying(tracked)) == 1:
        ctx.place("local", tracked, clash[0], params=[(*_owner(ctx.g.gm, str(s.target)), a) for s, _, a in cuts])
        line = np.moveaxis(tracked, clash[0], 0).reshape(tracked.shape[clash[0]], -1)[:, 0]
        for s, chain, a in cuts:
            _sized_on_the_way(ctx, s, chain, a, line)
    elif len(clash) < len(varying(tracked)):
        # it varies along some of the channels' axes only (a rotary table along each head's
        # dimensions): the others stay prunable, these stay whole
        for d in clash:
            ctx.fix_axis(tracked, d, f"{ctx.describe()} combines these channels with {t.name!r} along "
                                     f"axis {d}, whose channels are not tracked")
    else:
        ctx.freeze(tracked, f"{ctx.describe()} combines these channels with {t.name!r}, whose channels "
                            "are not tracked")
