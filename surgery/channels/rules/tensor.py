"""Channel rules for tensor functions and methods that move channels: cat/split/getitem, reshapes
and permutes, expand, size reads (element-wise ops: :mod:`.elementwise`). See
:mod:`surgery.channels.rules`.
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from ...calling import typed_dict
from ..rulebook import NO_CHANNELS, RuleContext, register_rule, varying
from .common import _fit, _nan_like, _vals, reshape_rule
from .operands import untracked_operand


# ----------------------------------------------------------------------------------------- functions
def _joined_values(out: np.ndarray, lays: list, vals: list) -> np.ndarray | None:
    """The values of tensors joined along an axis no channel varies along (a class token's cat
    with the patch tokens): a channel holds a known value where every part holds that value
    (CrossViT joins a branch's tokens with the other branch's projected class token, both zero
    where masked); None where an untracked part joins (its values along the channels are not
    followed)."""
    if any(x is None for x in lays) or any(v is None for v in vals):
        return None
    try:
        parts = [np.broadcast_to(v, out.shape) for v in vals]
    except ValueError:
        return None
    joined = parts[0].copy()
    for v in parts[1:]:
        joined = np.where(joined == v, joined, np.nan)
    return joined


def cat_rule(ctx: RuleContext):
    n = ctx.node
    tensors = list(n.args[0] if n.args else n.kwargs["tensors"])
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    stack = getattr(n.target, "__name__", "") == "stack"
    out_shape = ctx.shape()
    lays = [ctx.ids(t) for t in tensors]
    if all(x is None for x in lays) or out_shape is None:
        return None
    if stack:  # stack = unsqueeze then cat
        dim = dim % len(out_shape)
        lays = [np.expand_dims(x, dim) if x is not None else None for x in lays]
        shapes = [tuple(ctx.shape(t))[:dim] + (1,) + tuple(ctx.shape(t))[dim:] for t in tensors]
    else:
        dim = dim % len(out_shape)
        shapes = [tuple(ctx.shape(t)) for t in tensors]
    vals = [_vals(ctx, t, x) for t, x in zip(tensors, lays)]
    if stack:
        vals = [np.expand_dims(v, dim) if v is not None and ctx.values(t) is not None else v
                for t, v in zip(tensors, vals)]
    along = any(x is not None and x.shape[dim] > 1 for x in lays)
    if not along:
        tracked = [x for x in lays if x is not None]
        out = tracked[0]
        for x in tracked[1:]:
            out = ctx.couple(out, x)
        for t, x in zip(tensors, lays):  # a class token: a parameter of the model, cut alike
            if x is None:
                untracked_operand(ctx, t, out.reshape((1,) * (len(out_shape) - out.ndim) + out.shape), len(out_shape))
        return out, _joined_values(out, lays, vals)
    parts, vparts = [], []
    other = [max((x.shape[d] for x in lays if x is not None), default=1) if d != dim else None
             for d in range(len(out_shape))]
    for t, x, s, v in zip(tensors, lays, shapes, vals):
        target = tuple(s[dim] if d == dim else other[d] for d in range(len(out_shape)))
        if x is None:
            start = ctx.g.new_elements(s[dim], n)
            shp = [1] * len(out_shape)
            shp[dim] = s[dim]
            x = np.arange(start, start + s[dim]).reshape(shp)
            ctx.freeze(x, f"{ctx.describe()} stacks them with {getattr(t, 'name', t)!r}, whose channels "
                          "are not tracked")
            v = _nan_like(x)
        parts.append(np.broadcast_to(x, target))
        vparts.append(np.broadcast_to(v, target) if v is not None else np.full(target, np.nan))
    ctx.g.rewrite.add(n)
    return np.concatenate(parts, axis=dim), np.concatenate(vparts, axis=dim)


def getitem_rule(ctx: RuleContext):
    n = ctx.node
    src, idx = n.args[0], n.args[1]
    lay = ctx.ids(src)
    if isinstance(lay, tuple):
        if lay[idx] is None:  # an item without channels (beside items with: a list handed over)
            return NO_CHANNELS
        v = ctx.values(src)
        return lay[idx], (v[idx] if isinstance(v, tuple) else None)
    if lay is None or not isinstance(src, fx.Node) or ctx.shape(src) is None:
        return None
    items = list(idx) if isinstance(idx, tuple) else [idx]
    nd = lay.ndim
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        if i is Ellipsis:
            expanded += [slice(None)] * (nd - used)
        else:
            expanded.append(i)
    d = 0
    np_idx: list[Any] = []
    touched = False
    for i in expanded:
        if i is None:
            np_idx.append(None)
            continue
        if d >= nd:
            break
        if isinstance(i, slice) and all(isinstance(s, (int, type(None))) for s in (i.start, i.stop, i.step)):
            np_idx.append(i if lay.shape[d] > 1 else slice(None))
            touched |= lay.shape[d] > 1 and i != slice(None)
        elif isinstance(i, slice) and lay.shape[d] > 1 and (fixed := _run_time_slice(ctx, i, d, len(np_idx))):
            # x[..., :x.shape[-1] // 2] (rotate_half): bounds computed at run time follow the axis'
            # length, which must then stay whole
            np_idx.append(fixed)
            ctx.fix_axis(lay, d, f"{ctx.describe()} slices axis {d} at a position computed at run time")
        elif isinstance(i, int):
            np_idx.append(i if lay.shape[d] > 1 else 0)
            touched |= lay.shape[d] > 1
        else:
            if lay.shape[d] > 1:
                ctx.freeze(lay, f"{ctx.describe()} indexes the channels with {type(i).__name__}")
                return None
            np_idx.append(slice(None))  # advanced index on an axis channels do not vary along
            if not isinstance(i, slice):
                return None
        d += 1
    if touched:
        if any(isinstance(i, slice) and i.step not in (None, 1) for i in np_idx if i is not None):
            ctx.freeze(lay, f"{ctx.describe()} slices the channels with a step")
        ctx.g.rewrite.add(n)
    out = lay[tuple(np_idx)]
    v = ctx.values(src)
    return out, (v[tuple(np_idx)] if v is not None else None)


def _run_time_slice(ctx: RuleContext, i: slice, d: int, out_axis: int) -> slice | None:
    """The concrete slice of a slice with one bound computed at run time (a node), from the
    input and output lengths; None when it cannot be told."""
    if i.step not in (None, 1) or isinstance(i.start, fx.Node) and isinstance(i.stop, fx.Node):
        return None
    size, out = ctx.shape(ctx.node.args[0]), ctx.shape()
    if size is None or out is None or out_axis >= len(out):
        return None
    n, m = size[d], out[out_axis]
    if isinstance(i.stop, fx.Node) and i.start in (None, 0):
        return slice(0, m)
    if isinstance(i.start, fx.Node) and i.stop is None:
        return slice(n - m, n)
    return None


def split_rule(ctx: RuleContext):
    n = ctx.node
    x = ctx.x
    lay = ctx.ids(x)
    shapes = n.meta.get("shape")
    if lay is None or not isinstance(shapes, tuple):
        return None
    name = getattr(n.target, "__name__", str(n.target))
    if name == "unbind":
        dim = ctx.arg(1, "dim", 0) % lay.ndim
        if lay.shape[dim] > 1:
            ctx.g.rewrite.add(n)
        return tuple(np.take(lay, i if lay.shape[dim] > 1 else 0, axis=dim) for i in range(len(shapes))), None
    dim = ctx.arg(2 if name in ("split", "tensor_split") else 2, "dim", 0) % lay.ndim
    v = ctx.values(x)
    if lay.shape[dim] == 1:
        return tuple(lay for _ in shapes), (tuple(v for _ in shapes) if v is not None else None)
    sizes = [s[dim] for s in shapes]
    cuts = np.cumsum(sizes)[:-1]
    ctx.g.rewrite.add(n)
    parts = tuple(np.split(lay, cuts, axis=dim))
    return parts, (tuple(np.split(v, cuts, axis=dim)) if v is not None else None)


def permute_rule(ctx: RuleContext):
    n = ctx.node
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    nd = lay.ndim
    name = getattr(n.target, "__name__", str(n.target))
    rest = list(n.args[1:])
    if name == "permute":
        dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if not dims:
            dims = list(n.kwargs.get("dims", []))
        perm = [d % nd for d in dims]
    elif name in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = (rest + [n.kwargs.get("dim0"), n.kwargs.get("dim1")])[:2]
        perm = list(range(nd))
        perm[d0 % nd], perm[d1 % nd] = perm[d1 % nd], perm[d0 % nd]
    elif name in ("t",):
        perm = list(range(nd))[::-1]
    elif name == "movedim":
        src, dst = rest[0], rest[1]
        order = list(range(nd))
        order.remove(src % nd)
        order.insert(dst % nd, src % nd)
        perm = order
    else:
        return None
    v = ctx.values(ctx.x)
    return np.transpose(lay, perm), (np.transpose(v, perm) if v is not None else None)


def size_rule(ctx: RuleContext):
    """x.size() / x.shape / x.numel(): remember who reads a channel count (see size_uses_ok)."""
    n = ctx.node
    x = ctx.x
    lay = ctx.ids(x)
    if n.op == "call_function" and n.target is getattr and n.args[1] != "shape":
        return None
    if lay is None or not varying(lay):
        return None
    ctx.g.size_nodes.append((n, x))
    return None


def expand_rule(ctx: RuleContext):
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    if varying(lay):
        ctx.g.rewrite.add(ctx.node)
    nd = len(ctx.shape())
    v = ctx.values(ctx.x)  # copies of the same values: zeros stay zeros (repeat_kv's expand)
    lift = (1,) * (nd - lay.ndim)
    carried = v.reshape(lift + v.shape) if v is not None and v.shape == lay.shape else None
    return lay.reshape(lift + lay.shape), carried


register_rule("expand", expand_rule)
for _t in [torch.cat, torch.concat, torch.stack]:
    register_rule(_t, cat_rule)
register_rule(operator.getitem, getitem_rule)
for _t in [torch.split, torch.chunk, torch.unbind, "split", "chunk", "unbind"]:
    register_rule(_t, split_rule)
for _t in [torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, "flatten", "view", "reshape",
           "squeeze", "unsqueeze"]:
    register_rule(_t, reshape_rule)
for _t in [torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.t,
           "permute", "transpose", "swapaxes", "t", "movedim"]:
    register_rule(_t, permute_rule)
for _t in ["size", getattr, "numel"]:
    register_rule(_t, size_rule)


def reshape_as_rule(ctx: RuleContext):
    """``x.reshape_as(other)`` / ``x.view_as(other)``: a reshape to `other`'s shape, which the
    shrunk graph reads at run time (LeViT's BatchNorm over flattened tokens:
    ``bn(x.flatten(0, 1)).reshape_as(x)``). So where the result holds channels, `other` must
    hold the same ones there: the two are coupled, or, `other` untracked, they freeze."""
    out = reshape_rule(ctx)
    if out is None:
        return None
    lay, vals = out
    other = ctx.arg(1, "other")
    io = ctx.ids(other)
    if io is None:
        if varying(lay):
            ctx.freeze(lay, f"{ctx.describe()} takes the shape of {getattr(other, 'name', other)!r}, whose "
                            "channels are not tracked")
            return None
        return lay, vals
    lay = ctx.couple(lay, io)
    return lay, _fit(vals, lay.shape)


def typed_dict_rule(ctx: RuleContext):
    """A ModelOutput (or OrderedDict) built in the graph (:func:`surgery.calling.typed_dict`): its
    fields keep their shapes, so the channels in them stay, each named by its field."""
    name, fields = ctx.node.args[0], ctx.node.args[1]
    to_output = any(u.op == "output" for u in ctx.node.users)
    for key, value in fields.items():
        nodes: list[fx.Node] = []
        fx.node.map_arg(value, nodes.append)
        for n in nodes:
            lay = ctx.ids(n)
            for part in (lay if isinstance(lay, tuple) else (lay,)):
                ctx.freeze(part, f"reaches the model output as {key!r}" if to_output else
                           f"is packed into {name.rpartition(':')[2]} as {key!r}, which the rules do not follow")
    return None


register_rule(typed_dict, typed_dict_rule)
for _t in ("reshape_as", "view_as"):
    register_rule(_t, reshape_as_rule)
