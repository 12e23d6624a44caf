"""Attention by head dimensions (``ChannelPrune(attention="head_dims")``), for the rules of
:mod:`.attention`: position i of every head is one channel, so all heads keep the same size and
get narrower together. In ``q @ k^T`` a position of q goes with the same position of k (a zero on
either side drops it from the scores); in ``attn @ v`` v's positions are carried to the output
and on to the output projection's columns. Rotary embeddings keep q's and k's positions whole
(their tables are fixed axes, see :meth:`RuleContext.fix_axis`); v's still go.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..rulebook import RuleContext, varying


def _lift(x: np.ndarray | None, nd: int) -> np.ndarray | None:
    return x.reshape((1,) * (nd - x.ndim) + x.shape) if x is not None else None


HEAD_DIMS = "head_dims"


def head_dims(ctx: RuleContext) -> bool:
    """Whether this graph prunes attention by head dimensions instead of whole heads: set by
    ``ChannelPrune(attention="head_dims")`` as ``gm.meta["surgery"]["attention_units"]``."""
    return ctx.g.gm.meta.get("surgery", {}).get("attention_units") == HEAD_DIMS


def _across_heads(ctx: RuleContext, x: np.ndarray, what: str) -> np.ndarray | None:
    """Head-dimension mode: couple position i of every head (the batch axes of `x`) into one
    channel, and return the layout of one head, its batch axes of size 1. Position i then goes
    from every head at once, so all heads keep the same size (a reshape needs that). Channels
    along the batch axes only (a bias per head) have no position: they freeze."""
    nd = x.ndim
    rep = x[tuple(slice(0, 1) if d < nd - 2 else slice(None) for d in range(nd))]
    ctx.couple(x, rep)
    if not any(d >= nd - 2 for d in varying(x)):
        ctx.freeze(rep, f"{ctx.describe()} combines {what} per head, and heads are not pruned (attention='head_dims')")
        return None
    return rep


def _either_zero(a: np.ndarray | None, b: np.ndarray | None, shape: tuple) -> np.ndarray | None:
    """0 where either operand of a contraction is known zero at that position (else NaN: not
    known); None where neither is known. `shape`: the shape of one side's positions."""
    flags = [np.broadcast_to(v[..., :1, :] if v.ndim >= 2 else v, shape) == 0 for v in (a, b) if v is not None]
    if not flags:
        return None
    return np.where(np.logical_or.reduce(flags), 0.0, np.nan)


def _one_head_values(ctx: RuleContext, t: Any, rep: np.ndarray | None, nd: int) -> np.ndarray | None:
    """The known values of `t` for the layout `rep` of :func:`_across_heads`: 0 where a position
    is zero in every head, NaN (not known) elsewhere; None where nothing is known."""
    v = ctx.values(t)
    if rep is None or v is None or v.shape != ctx.ids(t).shape:
        return None
    zero = (_lift(v, nd) == 0).all(axis=tuple(range(nd - 2)), keepdims=True)
    return np.where(zero, 0.0, np.nan) if zero.shape == rep.shape else None


def _sdpa_dims(ctx: RuleContext, qkv: tuple, ids: list) -> tuple[np.ndarray, np.ndarray | None] | None:
    """:func:`sdpa_rule` by head dimensions: q's position i with k's (the scores sum over it, so a
    zero in either drops it), v's positions carried to the output. The default scale is
    1/sqrt(q's width): Shrink passes the original one explicitly when that width shrinks."""
    node, nd = ctx.node, len(ctx.shape())
    q, k, v = qkv
    rq, rk, rv = (_across_heads(ctx, x, "channels") if x is not None else None for x in ids)
    lay = ctx.ids(ctx.arg(3, "attn_mask"))
    if lay is not None:  # a bias per head made by the model (T5's relative positions): kept whole
        ctx.freeze(lay, f"{ctx.describe()} adds it to the scores per head, and heads are not pruned "
                        "(attention='head_dims')")
    for r in (rq, rk, rv):
        if r is not None and varying(r) != [nd - 1]:
            ctx.freeze(r, f"{ctx.describe()} attends over channels that also vary along other axes")
            return None
    total = ctx.shape(q)[-1]
    scale_given = ctx.arg(6, "scale") is not None

    def keep_scale(kept: np.ndarray) -> None:
        if not scale_given and int(kept.sum()) < total:
            node.kwargs = {**node.kwargs, "scale": float(total) ** -0.5}
    sides = [(pos, r, _one_head_values(ctx, t, r, nd)) for pos, (t, r) in enumerate(((q, rq), (k, rk)))
             if r is not None]
    if len(sides) == 2:  # one position of q and k: a zero on either side drops it from the scores
        ctx.couple(rq[..., :1, :], rk[..., :1, :])
        sides = [(0, rq[..., :1, :], _either_zero(sides[0][2], sides[1][2], rq[..., :1, :].shape))]
    for pos, r, vals in sides:
        ctx.place("reader", r, nd - 1, arg=pos, kind="zero", values=vals, edit=keep_scale)
    if rv is None:
        return None
    return rv, _one_head_values(ctx, v, rv, nd)
