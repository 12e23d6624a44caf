"""Channel rules for ops that move entries along axes: ``torch.roll``, ``torch.flip``, and the
windows of ``Tensor.unfold`` and ``F.unfold``. See :mod:`surgery.channels.rules`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..rulebook import RuleContext, register_rule, varying


def roll_rule(ctx: RuleContext):
    """``torch.roll(x, shifts, dims)``: moves entries along `dims`; channel-local when no channels
    vary along them (Swin's cyclic shift of a channels-last map)."""
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    dims = ctx.arg(2, "dims", None)
    dims = [d % lay.ndim for d in (dims if isinstance(dims, (tuple, list)) else [dims])] if dims is not None else None
    if dims is None or any(lay.shape[d] > 1 for d in dims):
        ctx.freeze(lay, f"{ctx.describe()} moves entries along the channels' axis")
        return None
    return lay, ctx.values(ctx.x)


for _t in [torch.roll, "roll"]:
    register_rule(_t, roll_rule)


def flip_rule(ctx: RuleContext):
    """``torch.flip(x, dims)``: reverses entries along `dims`, channels included (their layout
    reverses with them; the op needs no size)."""
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    dims = ctx.arg(1, "dims", None)
    dims = tuple(d % lay.ndim for d in (dims if isinstance(dims, (tuple, list)) else [dims]))
    v = ctx.values(ctx.x)
    return np.flip(lay, dims).copy(), (np.flip(v, dims).copy() if v is not None else None)


for _t in [torch.flip, "flip"]:
    register_rule(_t, flip_rule)


def unfold_rule(ctx: RuleContext):
    """``x.unfold(dim, size, step)``: windows along `dim`, each a new last axis (HaloNet's
    neighbourhoods). Channel-local where no channels vary along `dim`; every entry is one of x's,
    so the values follow."""
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    dim = ctx.arg(1, "dimension") % lay.ndim
    if lay.shape[dim] > 1:
        ctx.freeze(lay, f"{ctx.describe()} takes windows across the channels' axis")
        return None
    v = ctx.values(ctx.x)
    return lay[..., None], (v[..., None] if v is not None else None)


def im2col_rule(ctx: RuleContext):
    """``F.unfold(x, kernel_size, ...)`` (im2col): (N, C, H, W) -> (N, C * k, L), each channel's
    k kernel positions next to each other. So channel c holds positions c*k .. c*k + k - 1 of the
    result (a reader cuts those columns), and a zero channel stays zero (the padding is zero)."""
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    shape, out_shape = ctx.shape(ctx.x), ctx.shape()
    if shape is None or out_shape is None or len(shape) != 4 or varying(lay) != [1]:
        ctx.freeze(lay, f"{ctx.describe()} unfolds patches with channels along other axes than 1")
        return None
    k = out_shape[1] // shape[1]
    out = np.repeat(lay.reshape(-1), k).reshape(1, -1, 1)
    v = ctx.values(ctx.x)
    vals = np.repeat(np.where(v.reshape(-1) == 0, 0.0, np.nan), k).reshape(1, -1, 1) if v is not None else None
    return out, vals


register_rule("unfold", unfold_rule)
register_rule(F.unfold, im2col_rule)
