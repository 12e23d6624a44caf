"""Helpers that several rule files share: per-entry constant values, the owner of a get_attr
target, the spatial check of pooling, and the rule bodies that a module and its functional form
have in common (linear, layer norm, softmax, pooling, reshape). Rule files import this one and
never each other.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ...graph import submodule
from ..rulebook import RuleContext, varying


def _nan_like(ids: np.ndarray) -> np.ndarray:
    return np.full(ids.shape, np.nan)


def _vals(ctx: RuleContext, a: Any, ids: np.ndarray | None) -> np.ndarray | None:
    v = ctx.values(a)
    if v is None and ids is not None:
        return _nan_like(ids)
    return v


def _fit(values: np.ndarray | None, shape: tuple) -> np.ndarray | None:
    """`values` broadcast to a layout's `shape` (a writable copy); None where they do not fit."""
    try:
        return np.broadcast_to(values, shape).copy() if values is not None else None
    except ValueError:
        return None


def _owner(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    prefix, _, name = target.rpartition(".")
    return submodule(gm, prefix), name


def _spatial_ok(ctx: RuleContext, ids: np.ndarray, dims: list[int]) -> bool:
    bad = [d for d in dims if d < ids.ndim and ids.shape[d] > 1]
    if bad:
        ctx.freeze(ids, f"{ctx.describe()} mixes entries along axis {bad[0]}, where channels vary")
        return False
    return True


def _linear(ctx, ids, rparams, rattrs, pparams, pattrs, arg: int = 0):
    """A linear map over the last axis: it reads argument `arg`'s channels there (`rparams`, its
    weight's input axis) and makes fresh ones (`pparams`)."""
    if ids is not None:
        v = varying(ids)
        if v and ids.ndim - 1 not in v:
            # a Linear over an axis the channels do not vary on is channel-local (MLP-Mixer's token
            # mixing); with a bias it maps a zero channel to that bias, so the group's mask goes
            # after it too (see points.mask_points)
            if len(v) == 1 and any(n == "bias" and isinstance(getattr(o, n, None), torch.Tensor)
                                   for o, n, _ in pparams):
                ctx.place("shift", ids, v[0])
            return ids, None
        _reads_last_axis(ctx, ids, rparams, rattrs, arg)
    return ctx.new_space(-1, params=pparams, attrs=pattrs)


def _reads_last_axis(ctx, ids, params, attrs, arg: int = 0) -> None:
    """Argument `arg` (layout `ids`) is read through weights over its last axis (`params`: each
    weight's input axis, `attrs`: the width attributes): a reader of its channels there. Channels
    that also vary along other axes freeze."""
    v = varying(ids)
    if v and v != [ids.ndim - 1]:
        ctx.freeze(ids, f"{ctx.describe()} reads channels that also vary along other axes")
    else:
        ctx.place("reader", ids, -1, arg=arg, params=params, attrs=attrs, kind="linear",
                  values=ctx.values(ctx.node.args[arg] if len(ctx.node.args) > arg else None))


def normalised(ctx: RuleContext) -> bool:
    """Whether channels a norm or a mean reads may go (Shrink then rewrites the op to keep
    dividing by the original width): False where ``ChannelPrune(normalised=False)`` said so, as
    ``gm.meta["surgery"]["normalised"]``, for a model to be shrunk into its own classes."""
    return ctx.g.gm.meta.get("surgery", {}).get("normalised", True) is not False


def _layernorm(ctx: RuleContext, k: int, rms: bool = False, params=(), edit=None):
    """A LayerNorm (or, `rms`, an RMSNorm) over the last `k` axes. Over the channel axis alone it
    reads its input's channels for its statistics (a reader of zeros: `edit` makes Shrink emit a
    norm that keeps the original divisor, see :mod:`surgery.norms`) and applies `params`
    (attribute -> axis 0) per channel. An RMSNorm maps zero to zero, so its output channels are
    its input's; a LayerNorm's output at a zero channel is not zero, so its output is a producer
    of the same channels: masks go after it too. Without `edit`, or over more axes, the
    channels freeze."""
    ids = ctx.ids(ctx.x)
    if ids is None:
        return None
    inside = [d for d in varying(ids) if d >= ids.ndim - k]
    if not inside:
        return ids, None
    if len(inside) < len(varying(ids)):
        # a norm inside each unit (Qwen3's RMSNorm over each head's dimensions): each slice it
        # normalises is one channel, so its own parameters never lose an entry
        ctx.couple(ids, ids[tuple(slice(0, 1) if d >= ids.ndim - k else slice(None) for d in range(ids.ndim))])
        return ids, None
    if k != 1 or edit is None or varying(ids) != [ids.ndim - 1] or not normalised(ctx):
        ctx.freeze(ids, f"{ctx.describe()} counts these channels in its statistics")
        return ids, None
    ctx.place("reader", ids, -1, arg=0, kind="zero", values=ctx.values(ctx.x), edit=edit)
    if rms:
        ctx.place("local", ids, -1, params=list(params))
        v = ctx.values(ctx.x)
        return ids, (np.where(v == 0, 0.0, np.nan) if v is not None else None)
    out = ctx.new_space(-1, params=list(params))
    return ctx.couple(out, ids), None


def _group_norm(ctx: RuleContext, groups: int = 1, params=(), edit=None):
    """A GroupNorm (PoolFormer's of one group, timm's GroupNorm1, a detection head's of 32):
    statistics per group over its channels and every axis after them, per-channel parameters on
    axis 1. As a LayerNorm over the channels (:func:`_layernorm`): a reader of zeros that `edit`
    rewrites to keep each group's divisor (:func:`surgery.norms.emit_group_norm`), and a producer
    of the same channels, its output at a zero channel being the bias and more. With several
    groups, a position within a group goes from every group at once (each keeps as many). Channels
    along other axes, or no `edit`, freeze."""
    ids = ctx.ids(ctx.x)
    if ids is None:
        return None
    if edit is None or varying(ids) != [1] or ids.shape[1] % groups or not normalised(ctx):
        ctx.freeze(ids, f"{ctx.describe()} counts these channels in its statistics")
        return ids, None
    if groups > 1:
        grid = ids.reshape(groups, -1)
        ctx.couple(grid, grid[:1])
    ctx.place("reader", ids, 1, arg=0, kind="zero", values=ctx.values(ctx.x), edit=edit)
    out = ctx.new_space(1, params=list(params))
    return ctx.couple(out, ids), None


def pool_rule(ctx: RuleContext):
    ids = ctx.ids(ctx.x)
    if ids is None:
        return None
    m = ctx.module
    name = type(m).__name__ if m is not None else getattr(ctx.node.target, "__name__", str(ctx.node.target))
    nd = int(name[-2]) if name[-2:-1].isdigit() else ids.ndim - 2
    if not _spatial_ok(ctx, ids, list(range(ids.ndim - nd, ids.ndim))):
        return ids, None
    v = ctx.values(ctx.x)
    if v is None:
        return ids, None
    if "max" in name.lower() or "adaptive" in name.lower():
        return ids, v
    if "avg" in name.lower():
        pad = getattr(m, "padding", ctx.arg(3, "padding", 0)) if m is not None else ctx.arg(3, "padding", 0)
        ceil = getattr(m, "ceil_mode", False) if m is not None else ctx.arg(4, "ceil_mode", False)
        if not ceil and all(p == 0 for p in (pad if isinstance(pad, (tuple, list)) else (pad,))):
            return ids, v
    return ids, np.where(v == 0, 0.0, np.nan)


def spatial_keep_rule(ctx: RuleContext):
    """Upsampling/interpolation: a constant channel stays constant."""
    ids = ctx.ids(ctx.x)
    if ids is None:
        return None
    if not _spatial_ok(ctx, ids, list(range(2, ids.ndim))):
        return ids, None
    return ids, ctx.values(ctx.x)


def _softmax(ctx: RuleContext, dim):
    """A softmax over `dim`: channel-local where no channels vary along it. Where they vary along it
    and along other axes too (SKNet's attention over its paths, (B, paths, C, 1, 1)), each slice it
    normalises becomes one unit, so a channel goes from every path at once and the others' sums
    keep their terms. Across the channels alone, they freeze."""
    ids = ctx.ids(ctx.x)
    if ids is None:
        return None
    d = dim % ids.ndim if dim is not None else None
    if d is not None and d not in varying(ids):
        return ids, None
    if d is None or varying(ids) == [d]:
        ctx.freeze(ids, f"{ctx.describe()} normalises across these channels")
        return ids, None
    ctx.couple(ids, ids[tuple(slice(0, 1) if k == d else slice(None) for k in range(ids.ndim))])
    return ids, None


def reshape_rule(ctx: RuleContext):
    x = ctx.x
    lay = ctx.ids(x)
    if lay is None:
        return None
    a, b = tuple(ctx.shape(x)), tuple(ctx.shape())
    out = _reshape(lay, a, b)
    v = ctx.values(x)
    if out is None:
        ctx.freeze(lay, f"{ctx.describe()} reshapes the channels in a way the rules cannot follow")
        return None
    if varying(lay) and ctx.node.op == "call_method" and ctx.node.target in ("view", "reshape") or \
            ctx.node.target is torch.reshape:
        ctx.g.rewrite.add(ctx.node)
    vals = _reshape(v, a, b) if v is not None else None
    return _compact(out, vals)  # DeBERTa's heads, merged into the batch axis and split off again


def _compact(lay: np.ndarray, vals: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """`lay` with every axis cut to length 1 along which it holds the same ids at each position:
    a reshape that splits (B*H) back into (B, H) spreads the heads' ids over B too, and one that
    merges the channels with the batch and a spatial axis and splits them off again (MobileViT's
    unfold, (B*C*nh, ...) -> (B, C, N, P)) spreads them over N. `vals` (the known values, same
    shape) alike, a value kept where it is the same all along. An axis whose ids differ between
    positions keeps its length, even where some repeat (a kv head held for each of its query
    heads): the mask and shrink rules read such layouts position by position."""
    if vals is not None and vals.shape != lay.shape:
        vals = None
    for d in range(lay.ndim if lay.ndim >= 2 else 0):
        if lay.shape[d] == 1 or not (lay == np.take(lay, [0], axis=d)).all():
            continue
        if vals is not None:
            first = np.take(vals, [0], axis=d)
            same = ((vals == first) | (np.isnan(vals) & np.isnan(first))).all(axis=d, keepdims=True)
            vals = np.where(same, first, np.nan)
        lay = np.take(lay, [0], axis=d)
    return lay, vals


def _reshape(lay: np.ndarray, a: tuple, b: tuple) -> np.ndarray | None:
    ai = [d for d in range(len(a)) if a[d] != 1]
    bi = [d for d in range(len(b)) if b[d] != 1]
    groups: list[tuple[list[int], list[int]]] = []
    p = q = 0
    while p < len(ai) and q < len(bi):
        ga, gb = [ai[p]], [bi[q]]
        pa, pb = a[ai[p]], b[bi[q]]
        p, q = p + 1, q + 1
        while pa != pb:
            if pa < pb:
                if p >= len(ai):
                    return None
                pa *= a[ai[p]]
                ga.append(ai[p])
                p += 1
            else:
                if q >= len(bi):
                    return None
                pb *= b[bi[q]]
                gb.append(bi[q])
                q += 1
        groups.append((ga, gb))
    if p != len(ai) or q != len(bi):
        return None
    tin, tout = [1] * len(a), [1] * len(b)
    for ga, gb in groups:
        if any(lay.shape[d] > 1 for d in ga):
            for d in ga:
                tin[d] = a[d]
            for d in gb:
                tout[d] = b[d]
    return np.broadcast_to(lay, tin).reshape(tout)


# ----------------------------------------------------------------------------------------- conv, batch norm
def no_folds(ctx: RuleContext, first: int) -> None:
    """The places recorded since `first` may only remove channels that are zero: a constant folded
    into a module's bias would be lost where the call passes its own bias (or none)."""
    for p in ctx.g.places[first:]:
        if p.kind in ("conv", "linear"):
            p.kind = "zero"


_ConvNd = nn.modules.conv._ConvNd


def conv_rule(ctx: RuleContext):
    m = ctx.module
    transposed = bool(getattr(m, "transposed", False))
    ids = ctx.ids(ctx.x)
    if ids is not None and any(d != 1 for d in varying(ids)):
        if _pointwise(m) and m.out_channels == 1:
            return _positions_through(ctx, m, ids)
        ctx.freeze(ids, f"{ctx.describe()} reads channels that vary along its spatial axes")
        ids = None
    G, cin = m.groups, m.in_channels
    bias = [(m, "bias", 0)]  # always: a constant fold may add a bias later
    if G == 1:
        if ids is not None:
            ctx.place("reader", ids, 1, arg=0, params=[(m, "weight", 0 if transposed else 1)],
                      attrs=[(m, "in_channels")], kind="zero" if transposed else "conv",
                      values=ctx.values(ctx.x))
        return ctx.new_space(1, params=[(m, "weight", 1 if transposed else 0), *bias], attrs=[(m, "out_channels")])
    if G == cin and not transposed:
        if ids is None:
            out = ctx.new_space(1, params=[(m, "weight", 0), *bias])
            ctx.freeze(out, f"{ctx.describe()} is depthwise and its input channels are not tracked")
            return out
        return depthwise(ctx, m, ids, [(m, "weight", 0), *bias])
    if transposed:
        ctx.freeze_inputs(f"{ctx.describe()} is a grouped transposed convolution")
        return None
    if ids is not None:
        ctx.place("reader", ids, 1, arg=0, groups=G, edit=lambda kept: cut_grouped_inputs(m, kept, G),
                  values=ctx.values(ctx.x))
    return ctx.new_space(1, params=[(m, "weight", 0), *bias], attrs=[(m, "out_channels")], groups=G)


def _pointwise(m: nn.Module) -> bool:
    """A convolution that maps each position on its own: kernel 1, stride 1, no padding, one group."""
    pad = m.padding if not isinstance(m.padding, str) else (0,) if m.padding in ("valid", "same") else (1,)
    return not getattr(m, "transposed", False) and m.groups == 1 and all(k == 1 for k in m.kernel_size) and \
        all(s == 1 for s in m.stride) and all(p == 0 for p in pad)


def _positions_through(ctx: RuleContext, m: nn.Module, ids: np.ndarray):
    """A pointwise convolution to one channel over positions that carry channels (CoaT's
    ``aggregate``, a Conv1d from 3 stacked class tokens to 1 over (B, 3, C)): each output position
    reads the inputs at that position alone, so the channels pass along the positions, those
    stacked at one position coupled; its own input and output channels stay whole. A removed
    position holds the bias plus the weights times the inputs' constants there."""
    out = ids
    for k in range(1, ids.shape[1]):
        out = ctx.couple(out, ids[:, k:k + 1])
    out = out[:, :1]
    v = ctx.values(ctx.x)
    if v is None or v.shape[1] not in (1, m.in_channels):
        return out, None
    w = m.weight.detach().double().reshape(-1).numpy()  # (in_channels,)
    b = float(m.bias.detach()[0]) if m.bias is not None else 0.0
    v = np.broadcast_to(v, (v.shape[0], m.in_channels, *v.shape[2:]))
    return out, np.expand_dims(np.tensordot(w, np.moveaxis(v, 1, 0), axes=(0, 0)), 1) + b


def depthwise(ctx: RuleContext, m: nn.Module, ids: np.ndarray, params: list, scales: bool = True):
    """A depthwise convolution `m` (groups == in_channels, k outputs per input) reading channels
    `ids`: channel-local, each input's k outputs its copies; Shrink sets the new widths. A
    constant channel's outputs are known where the weight scales it (`scales`) and nothing pads;
    otherwise only a zero channel's, its bias."""
    k = m.out_channels // m.in_channels
    out = np.repeat(ids, k, axis=1) if ids.shape[1] > 1 else ids

    def edit(kept: np.ndarray) -> None:
        n = int(kept.sum())
        m.out_channels, m.in_channels, m.groups = n, n // k, n // k
    ctx.place("local", out, 1, params=params, edit=edit)
    v = ctx.values(ctx.x)
    if v is None:
        return out, None
    b = m.bias.detach().double().numpy() if m.bias is not None else np.zeros(m.out_channels)
    vin = np.repeat(v, k, axis=1) if v.shape[1] > 1 else v
    vb = b.reshape([1, -1] + [1] * (ids.ndim - 2))
    pad0 = all(p == 0 for p in m.padding) if not isinstance(m.padding, str) else m.padding == "valid"
    if scales and pad0:
        wsum = m.weight.detach().double().sum(dim=tuple(range(1, m.weight.dim()))).numpy()
        return out, vin * wsum.reshape(vb.shape) + vb
    return out, np.where(vin == 0, vb, np.nan)


def group_columns(w: torch.Tensor, groups: int, columns: np.ndarray) -> torch.Tensor:
    """Of a grouped convolution's weight `w` (out, in/groups, ...), for each filter the entries of
    `columns` (groups, n), the input positions to take within each group: (out, n, ...). Filter o
    belongs to group o // (out/groups) (`w` holding each group's filters, as many of each)."""
    rows = torch.as_tensor(columns).repeat_interleave(w.shape[0] // groups, dim=0)
    rows = rows.reshape(*rows.shape, *[1] * (w.dim() - 2)).expand(-1, -1, *w.shape[2:])
    return w.gather(1, rows)


def cut_grouped_inputs(m: nn.Module, kept: np.ndarray, G: int) -> None:
    """Shrink's edit of a convolution of `G` groups (as the analysis saw it: the module's own count
    may be cut already) whose input channels `kept` survive, as many in each group: each filter
    keeps its group's kept inputs, one gather."""
    w = m.weight.data
    idx = np.nonzero(kept.reshape(G, len(kept) // G))[1].reshape(G, -1)
    m.weight = nn.Parameter(group_columns(w, G, idx).contiguous(), requires_grad=m.weight.requires_grad)
    m.in_channels = int(kept.sum())


_BN_PARAMS = {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0}


def bn_values(ctx: RuleContext, v: np.ndarray):
    m = ctx.module
    if m.running_mean is None or m.running_var is None:
        return None
    a = m.running_var.detach().double().add(m.eps).rsqrt()
    b = -m.running_mean.detach().double() * a
    if m.weight is not None:
        a, b = a * m.weight.detach().double(), b * m.weight.detach().double()
    if m.bias is not None:
        b = b + m.bias.detach().double()
    shape = [1, -1] + [1] * (v.ndim - 2)
    if v.shape[1] != a.numel():
        return None
    return v * a.numpy().reshape(shape) + b.numpy().reshape(shape)
