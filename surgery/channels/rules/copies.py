"""Ops that copy a tensor's entries, fill them, or look them up: ``repeat`` (tiles),
``repeat_interleave`` (each entry several times in a row), ``gather``
(reads positions an index names), ``zeros_like`` and its kin (x's shape, one value). Each keeps
x's channels on the axes it does not rearrange."""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ..rulebook import RuleContext, register_rule, varying


def repeat_rule(ctx: RuleContext):
    """``x.repeat(*counts)``: x tiled, so position i of an axis holds x's position i % size, and
    each copy keeps the channels (DeBERTa's relative-position keys, repeated once per batch
    row). The counts stay as they are; one read from a size at run time is rewritten by Shrink
    (a count computed as ``size(0) // heads``: see shrink.counts)."""
    lay, out, src = ctx.ids(ctx.x), ctx.shape(), ctx.shape(ctx.x)
    if lay is None:
        return None
    if out is None or src is None:
        ctx.freeze_inputs(f"{ctx.describe()} has no recorded shapes")
        return None
    lift = (1,) * (len(out) - lay.ndim)
    lay = lay.reshape(lift + lay.shape)
    src = (1,) * (len(out) - len(src)) + tuple(src)
    tiles = tuple(o // s if n > 1 else 1 for o, s, n in zip(out, src, lay.shape))  # a broadcast axis stays 1
    v = ctx.values(ctx.x)
    carried = np.tile(v.reshape(lay.shape), tiles) if v is not None and v.size == lay.size else None
    return np.tile(lay, tiles), carried


def repeat_interleave_rule(ctx: RuleContext):
    """``x.repeat_interleave(k, dim)``: each position along `dim` k times in a row. Along an axis
    the channels do not vary on they pass through, whatever the counts (GCViT's global query,
    repeated along the batch for each window); along theirs each channel holds k neighbouring
    positions (an int k). Without a dim (the result flattened), or with counts per position
    along the channels' axis, they freeze."""
    a, kw = ctx.node.args, ctx.node.kwargs
    lay, out, src = ctx.ids(ctx.x), ctx.shape(), ctx.shape(ctx.x)
    if lay is None:
        return None
    dim = a[2] if len(a) > 2 else kw.get("dim")
    repeats = a[1] if len(a) > 1 else kw.get("repeats")
    if not isinstance(dim, int) or out is None or src is None or len(out) != len(src):
        ctx.freeze(lay, f"{ctx.describe()} flattens what it repeats, or has no recorded shapes")
        return None
    dim %= lay.ndim
    v = ctx.values(ctx.x)
    if dim not in varying(lay):
        return lay, v
    if isinstance(repeats, fx.Node) and isinstance(ctx.shape(repeats), torch.Size) and len(ctx.shape(repeats)):
        ctx.freeze(lay, f"{ctx.describe()} repeats each channel its own number of times")
        return None
    k = out[dim] // src[dim]
    carried = np.repeat(np.broadcast_to(v, lay.shape), k, axis=dim) if v is not None else None
    return np.repeat(lay, k, axis=dim), carried


def filled_like_rule(ctx: RuleContext):
    """``torch.zeros_like(x)`` and its kin: x's shape, so x's channels, each holding the fill."""
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    name = getattr(ctx.node.target, "__name__", "")
    fill = {"zeros_like": 0.0, "ones_like": 1.0}.get(name, ctx.node.args[1] if len(ctx.node.args) > 1 else None)
    known = isinstance(fill, (int, float)) and not isinstance(fill, bool)
    return lay, np.full(lay.shape, float(fill)) if known else None


def gather_rule(ctx: RuleContext):
    """``torch.gather(x, dim, index)``: along `dim` each output position reads the x position that
    `index` names, so channels along `dim` would be shuffled (frozen); along the other axes
    output, index and x match position for position, so x's channels pass through, and `index`
    (made from positions, DeBERTa's relative-position buckets expanded to ``x.size(0)`` heads and
    rows) follows them: the sizes it reads at run time shrink with x."""
    a = ctx.node.args
    kw = ctx.node.kwargs
    x = a[0] if a else kw.get("input")
    dim = a[1] if len(a) > 1 else kw.get("dim")
    index = a[2] if len(a) > 2 else kw.get("index")
    lay = ctx.ids(x)
    if lay is None:
        ctx.freeze_inputs(f"{ctx.describe()} gathers with an index whose channels are tracked")
        return None
    out, src, ishape = ctx.shape(), ctx.shape(x), ctx.shape(index)
    if not isinstance(dim, int) or out is None or src is None or ishape is None or ctx.ids(index) is not None:
        ctx.freeze(lay, f"{ctx.describe()} gathers along an axis or with an index it cannot follow")
        return None
    dim %= lay.ndim
    if dim in varying(lay) or any(out[d] != src[d] for d in varying(lay)):
        ctx.freeze(lay, f"{ctx.describe()} gathers along axis {dim}, where the channels vary")
        return None
    ctx.g.layouts[index] = lay  # (see checks.size_uses: a size of x that sizes index ties nothing)
    v = ctx.values(x)
    return lay, (v if v is not None and v.shape == lay.shape else None)


register_rule("repeat", repeat_rule)
for _t in (torch.repeat_interleave, "repeat_interleave"):
    register_rule(_t, repeat_interleave_rule)
for _t in (torch.gather, "gather"):
    register_rule(_t, gather_rule)
for _t in (torch.zeros_like, torch.ones_like, torch.full_like):
    register_rule(_t, filled_like_rule)
