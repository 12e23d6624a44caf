"""Channel rules for ops that move entries along axes: ``torch.roll`` and ``torch.flip``. See
:mod:`surgery.channels.rules`.
"""
from __future__ import annotations

import numpy as np
import torch

from ..rulebook import RuleContext, register_rule


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
