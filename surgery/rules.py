"""The standard channel rules: how each torch op moves channels (see surgery.channels).

Each rule takes a :class:`~surgery.channels.RuleContext` and returns the output layout, or
``(layout, values)`` where `values` are per-entry constants a channel is known to hold (nan =
unknown) so Shrink can tell a removed channel's readers see zero (or a foldable constant).
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .channels import RuleContext, channel_local, passthrough, register_rule, varying

# ----------------------------------------------------------------------------------------- helpers


def _nan_like(ids: np.ndarray) -> np.ndarray:
    return np.full(ids.shape, np.nan)


def _vals(ctx: RuleContext, a: Any, ids: np.ndarray | None) -> np.ndarray | None:
    v = ctx.values(a)
    if v is None and ids is not None:
        return _nan_like(ids)
    return v


def _owner(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    prefix, _, name = target.rpartition(".")
    return (gm.get_submodule(prefix) if prefix else gm), name


def _spatial_ok(ctx: RuleContext, ids: np.ndarray, dims: list[int]) -> bool:
    bad = [d for d in dims if d < ids.ndim and ids.shape[d] > 1]
    if bad:
        ctx.freeze(ids, f"{ctx.describe()} mixes entries along axis {bad[0]}, where channels vary")
        return False
    return True


# ----------------------------------------------------------------------------------------- masks
def mask_rule(ctx: RuleContext):
    """A UnitMask: channel-local along ``mask.dim``; a zero factor makes the channel zero."""
    m = ctx.module
    ctx.g.mask_nodes.append(ctx.node)
    ids = ctx.ids(ctx.x)
    if ids is None:
        return None
    dim = m.dim % ids.ndim
    v = _vals(ctx, ctx.x, ids)
    f = m.factors().detach().double().cpu().numpy()
    if ids.shape[dim] != len(f):
        if ids.shape[dim] == 1 and not any(s > 1 for s in ids.shape):
            pass  # one channel broadcast: the mask scales positions we do not track
        return ids, None
    if any(s > 1 for d, s in enumerate(ids.shape) if d != dim):
        ctx.freeze(ids, f"mask {ctx.node.target!r} sees channels along more than its axis {m.dim}")
        return ids, None
    shape = [1] * ids.ndim
    shape[dim] = len(f)
    fb = f.reshape(shape)
    out = np.where(fb == 0, 0.0, v * fb)
    ctx.place("mask", ids, dim)
    return ids, out


# ----------------------------------------------------------------------------------------- modules
_ConvNd = nn.modules.conv._ConvNd


def conv_rule(ctx: RuleContext):
    m = ctx.module
    transposed = bool(getattr(m, "transposed", False))
    ids = ctx.ids(ctx.x)
    if ids is not None and any(d != 1 for d in varying(ids)):
        ctx.freeze(ids, f"{ctx.describe()} reads channels that vary along its spatial axes")
        ids = None
    G, cin, cout = m.groups, m.in_channels, m.out_channels
    bias = [(m, "bias", 0)]  # always: a constant fold may add a bias later
    if G == 1:
        if ids is not None:
            ctx.place("reader", ids, 1, arg=0, params=[(m, "weight", 0 if transposed else 1)],
                      attrs=[(m, "in_channels")], kind="zero" if transposed else "conv",
                      values=ctx.values(ctx.x))
        return ctx.new_space(1, params=[(m, "weight", 1 if transposed else 0), *bias], attrs=[(m, "out_channels")])
    if G == cin and not transposed:
        k = cout // cin
        if ids is None:
            out = ctx.new_space(1, params=[(m, "weight", 0), *bias])
            ctx.freeze(out, f"{ctx.describe()} is depthwise and its input channels are not tracked")
            return out
        out = np.repeat(ids, k, axis=1) if ids.shape[1] > 1 else ids

        def edit(kept: np.ndarray, m=m, k=k):
            n = int(kept.sum())
            m.out_channels, m.in_channels, m.groups = n, n // k, n // k
        ctx.place("local", out, 1, params=[(m, "weight", 0), *bias], edit=edit)
        v = ctx.values(ctx.x)
        vals = None
        if v is not None:
            b = m.bias.detach().double().numpy() if m.bias is not None else np.zeros(cout)
            vin = np.repeat(v, k, axis=1) if v.shape[1] > 1 else v
            vb = b.reshape([1, -1] + [1] * (ids.ndim - 2))
            pad0 = all(p == 0 for p in m.padding) if not isinstance(m.padding, str) else m.padding == "valid"
            if pad0:
                wsum = m.weight.detach().double().sum(dim=tuple(range(1, m.weight.dim()))).numpy()
                vals = vin * wsum.reshape(vb.shape) + vb
            else:
                vals = np.where(vin == 0, vb, np.nan)
        return out, vals
    if transposed:
        ctx.freeze_inputs(f"{ctx.describe()} is a grouped transposed convolution")
        return None
    if ids is not None:
        def edit_in(kept: np.ndarray, m=m, G=G):
            w = m.weight.data
            per = len(kept) // G
            idx = torch.as_tensor(np.nonzero(kept.reshape(G, per))[1].reshape(G, -1))
            wv = w.reshape(G, w.shape[0] // G, per, *w.shape[2:])
            new = torch.stack([wv[g][:, idx[g]] for g in range(G)]).reshape(w.shape[0], idx.shape[1], *w.shape[2:])
            m.weight = nn.Parameter(new.contiguous(), requires_grad=m.weight.requires_grad)
            m.in_channels = int(kept.sum())
        ctx.place("reader", ids, 1, arg=0, groups=G, edit=edit_in)
    return ctx.new_space(1, params=[(m, "weight", 0), *bias], attrs=[(m, "out_channels")], groups=G)


def linear_rule(ctx: RuleContext):
    m = ctx.module
    ids = ctx.ids(ctx.x)
    bias = [(m, "bias", 0)]  # always: a constant fold may add a bias later
    return _linear(ctx, ids, [(m, "weight", 1)], [(m, "in_features")],
                   [(m, "weight", 0), *bias], [(m, "out_features")])


def _linear(ctx, ids, rparams, rattrs, pparams, pattrs):
    if ids is not None:
        v = varying(ids)
        last = ids.ndim - 1
        if v and last not in v:
            return ids, None  # a Linear over an axis the channels do not vary on is channel-local
        if v and v != [last]:
            ctx.freeze(ids, f"{ctx.describe()} reads channels that also vary along other axes")
        else:
            ctx.place("reader", ids, -1, arg=0, params=rparams, attrs=rattrs, kind="linear",
                      values=ctx.values(ctx.x))
    return ctx.new_space(-1, params=pparams, attrs=pattrs)


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


def instancenorm_values(ctx: RuleContext, v: np.ndarray):
    m = ctx.module
    if getattr(m, "track_running_stats", False):
        return bn_values(ctx, v)
    b = m.bias.detach().double().numpy() if getattr(m, "bias", None) is not None else np.zeros(v.shape[1])
    if len(b) != v.shape[1]:
        return None
    # a constant channel normalises to zero, then the affine bias
    return np.where(np.isnan(v), np.nan, b.reshape([1, -1] + [1] * (v.ndim - 2)))


_BN_PARAMS = {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0}


def groupnorm_rule(ctx: RuleContext):
    m = ctx.module
    ids = ctx.ids(ctx.x)
    if ids is None:
        return None
    if m.num_groups != m.num_channels:
        ctx.freeze(ids, f"{ctx.describe()} normalises {m.num_channels // m.num_groups} channels together")
        return ids, None
    ps = [(m, k, 0) for k in ("weight", "bias") if getattr(m, k, None) is not None]
    ctx.place("local", ids, 1, params=ps, attrs=[(m, "num_channels"), (m, "num_groups")])
    return ids, instancenorm_values(ctx, _vals(ctx, ctx.x, ids))


def layernorm_rule(ctx: RuleContext):
    m = ctx.module
    return _layernorm(ctx, len(m.normalized_shape))


def _layernorm(ctx: RuleContext, k: int):
    ids = ctx.ids(ctx.x)
    if ids is None:
        return None
    if any(d >= ids.ndim - k for d in varying(ids)):
        ctx.freeze(ids, f"{ctx.describe()} counts these channels in its statistics")
    return ids, None


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


def softmax_module_rule(ctx: RuleContext):
    return _softmax(ctx, ctx.module.dim)


def _softmax(ctx: RuleContext, dim):
    ids = ctx.ids(ctx.x)
    if ids is None:
        return None
    if dim is None or dim % ids.ndim in varying(ids):
        ctx.freeze(ids, f"{ctx.describe()} normalises across these channels")
    return ids, None


def permute_module_rule(ctx: RuleContext):
    ids = ctx.ids(ctx.x)
    if ids is None:
        return None
    dims = list(ctx.module.dims)
    v = ctx.values(ctx.x)
    return np.transpose(ids, dims), (np.transpose(v, dims) if v is not None else None)


for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_rule(_cls, conv_rule)
register_rule(nn.Linear, linear_rule)
register_rule(nn.modules.batchnorm._BatchNorm,
              channel_local(_BN_PARAMS, attrs=("num_features",), values=bn_values))
register_rule(nn.modules.instancenorm._InstanceNorm,
              channel_local(_BN_PARAMS, attrs=("num_features",), values=instancenorm_values))
register_rule(nn.GroupNorm, groupnorm_rule)
register_rule(nn.LayerNorm, layernorm_rule)
for _cls in (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
             nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink,
             nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink):
    register_rule(_cls, passthrough("apply"))
for _cls in (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.FeatureAlphaDropout):
    register_rule(_cls, passthrough("keep"))


def prelu_rule(ctx: RuleContext):
    m = ctx.module
    if m.num_parameters == 1:
        return passthrough("apply")(ctx)
    return channel_local({"weight": 0}, attrs=("num_parameters",), values="apply")(ctx)


register_rule(nn.PReLU, prelu_rule)
for _cls in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
             nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d):
    register_rule(_cls, pool_rule)
for _cls in (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d):
    register_rule(_cls, spatial_keep_rule)
for _cls in (nn.Softmax, nn.LogSoftmax, nn.Softmin):
    register_rule(_cls, softmax_module_rule)
try:
    from torchvision.ops.misc import Permute as _TvPermute
    register_rule(_TvPermute, permute_module_rule)
except Exception:  # torchvision is optional
    pass


def flatten_module_rule(ctx: RuleContext):
    return reshape_rule(ctx)


register_rule(nn.Flatten, flatten_module_rule)


# ----------------------------------------------------------------------------------------- functions
def binary_rule(ctx: RuleContext):
    """Element-wise ops between tensors and/or scalars, with broadcasting."""
    n = ctx.node
    a = n.args[0] if n.args else n.kwargs.get("input")
    b = n.args[1] if len(n.args) > 1 else n.kwargs.get("other")
    ia, ib = ctx.ids(a), ctx.ids(b)
    out_shape = ctx.shape()
    if ia is None and ib is None or out_shape is None:
        return None
    nd = len(out_shape)
    lift = lambda x: x.reshape((1,) * (nd - x.ndim) + x.shape) if x is not None else None  # noqa: E731
    ia, ib = lift(ia), lift(ib)
    name = getattr(n.target, "__name__", str(n.target))
    if ib is not None and name in ("truediv", "div", "div_", "itruediv", "floordiv", "__truediv__"):
        ctx.freeze(ib, f"{ctx.describe()} divides by these channels (a removed one would be 0/0)")
    for t, tracked in ((a, ib if ia is None else None), (b, ia if ib is None else None)):
        if tracked is None or not isinstance(t, fx.Node):
            continue
        ts = ctx.shape(t)
        if ts is None:
            continue
        full = (1,) * (nd - len(ts)) + tuple(ts)
        clash = [d for d in varying(tracked) if full[d] > 1]
        if not clash:
            continue
        if t.op == "get_attr" and len(clash) == 1 and len(varying(tracked)) == 1:
            owner, attr = _owner(ctx.g.gm, str(t.target))
            ctx.place("local", tracked, clash[0], params=[(owner, attr, clash[0] - (nd - len(ts)))])
        else:
            ctx.freeze(tracked, f"{ctx.describe()} combines these channels with {t.name!r}, whose channels "
                                "are not tracked")
    out = ctx.couple(ia, ib) if ia is not None and ib is not None else (ia if ia is not None else ib)
    return out, _binary_values(ctx, a, b, ia, ib, out, name)


def _operand(ctx: RuleContext, t: Any, ids: np.ndarray | None, out: np.ndarray):
    if isinstance(t, (int, float, bool)):
        return torch.tensor(float(t), dtype=torch.float64)
    if not isinstance(t, fx.Node):
        return None
    if ids is not None:
        v = ctx.values(t)
        v = _nan_like(ids) if v is None else v
        return torch.as_tensor(v.reshape((1,) * (out.ndim - v.ndim) + v.shape))
    if t.op == "get_attr":
        owner, attr = _owner(ctx.g.gm, str(t.target))
        p = getattr(owner, attr)
        if isinstance(p, torch.Tensor) and p.dim() <= out.ndim:
            q = p.detach().double().reshape((1,) * (out.ndim - p.dim()) + tuple(p.shape))
            if all(s == 1 or s == o for s, o in zip(q.shape, out.shape)):
                return q
    return None  # an untracked tensor that varies: unknown


def _binary_values(ctx, a, b, ia, ib, out, name):
    ta, tb = _operand(ctx, a, ia, out), _operand(ctx, b, ib, out)
    za = ta is not None and ia is not None
    if ta is None and tb is None:
        return None
    zero_mul = name in ("mul", "imul", "mul_", "__mul__")
    if ta is None or tb is None:
        if zero_mul:
            known = ta if ta is not None else tb
            try:
                return np.broadcast_to(np.where(known.numpy() == 0, 0.0, np.nan), out.shape).copy()
            except ValueError:
                return None
        return None
    try:
        with torch.no_grad():
            if ctx.node.op == "call_method":
                r = getattr(ta, str(ctx.node.target).rstrip("_"))(tb, **ctx.node.kwargs)
            else:
                r = ctx.node.target(ta, tb, **ctx.node.kwargs)
        r = r.numpy()
        if zero_mul:
            r = np.where((ta.numpy() == 0) | (tb.numpy() == 0), 0.0, r)
        return r if r.shape == out.shape else None
    except Exception:
        del za
        return None


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
        if len(tracked) < len(lays):
            for x in tracked:
                ctx.freeze(x, f"{ctx.describe()} joins these channels with an untracked tensor")
        out = tracked[0]
        for x in tracked[1:]:
            out = ctx.couple(out, x)
        return out, None
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
    return out, (_reshape(v, a, b) if v is not None else None)


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


def size_uses_ok(g, size_node: fx.Node) -> fx.Node | None:
    """None when every use of a size read only steers reshapes; else the offending node."""
    lay = g.layouts.get(size_node.args[0])
    vary = set(varying(lay)) if lay is not None else set()
    whole = size_node.op == "call_function" or (size_node.target == "size" and len(size_node.args) < 2
                                                 and "dim" not in size_node.kwargs)
    if size_node.target == "numel":
        whole = False
    elif not whole:
        d = size_node.args[1] if len(size_node.args) > 1 else size_node.kwargs["dim"]
        if d % lay.ndim not in vary:
            return None
    frontier = [(size_node, whole)]
    seen = set()
    while frontier:
        node, is_tuple = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        for u in node.users:
            if is_tuple and u.op == "call_function" and u.target is operator.getitem:
                k = u.args[1]
                if isinstance(k, int) and k % lay.ndim not in vary:
                    continue
                frontier.append((u, False))
            elif u.op == "call_function" and u.target in _ARITH:
                frontier.append((u, False))
            elif _is_shape_arg_use(u, node):
                continue
            else:
                return u
    return None


_ARITH = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
          operator.neg, operator.pow}


def _is_shape_arg_use(u: fx.Node, v: fx.Node) -> bool:
    if u.op == "call_method" and u.target in ("view", "reshape", "expand", "repeat") and u.args and u.args[0] is not v:
        return True
    if u.op == "call_function" and u.target is torch.reshape and u.args and u.args[0] is not v:
        return True
    return False


def reduce_rule(ctx: RuleContext):
    n = ctx.node
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    name = getattr(n.target, "__name__", str(n.target))
    dims = ctx.arg(1, "dim", None)
    keep = ctx.arg(2, "keepdim", False)
    if dims is None:
        ctx.freeze(lay, f"{ctx.describe()} reduces over every axis")
        return None
    dims = [d % lay.ndim for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    hit = [d for d in dims if lay.shape[d] > 1]
    if hit:
        if name == "sum" and len(varying(lay)) == 1:
            ctx.place("reader", lay, hit[0], arg=0, kind="zero", values=ctx.values(ctx.x))
        else:
            ctx.freeze(lay, f"{ctx.describe()} reduces across these channels")
        return None
    out = lay if keep else np.squeeze(lay, axis=tuple(dims))
    v = ctx.values(ctx.x)
    if v is not None:
        v = v if keep else np.squeeze(v, axis=tuple(dims))
        if name == "sum":
            v = np.where(v == 0, 0.0, np.nan)
        elif name not in ("mean", "amax", "amin"):
            v = None
    return out, v


def softmax_fn_rule(ctx: RuleContext):
    return _softmax(ctx, ctx.arg(1, "dim", None))


def matmul_rule(ctx: RuleContext):
    n = ctx.node
    a, b = n.args[0], n.args[1]
    ia, ib = ctx.ids(a), ctx.ids(b)
    out_shape = ctx.shape()
    if ia is None and ib is None or out_shape is None:
        return None
    if ia is not None and ia.ndim < 2 or ib is not None and ib.ndim < 2:
        ctx.freeze_inputs(f"{ctx.describe()} multiplies vectors")
        return None
    outs = []
    contracted = []
    for x, k, pos in ((ia, -1, 0), (ib, -2, 1)):
        if x is None:
            continue
        v = varying(x)
        kd = x.ndim + k
        if kd in v:
            if v != [kd]:
                ctx.freeze_inputs(f"{ctx.describe()} contracts channels that also vary along other axes")
                return None
            ctx.place("reader", x, kd, arg=pos, kind="zero", values=ctx.values(n.args[pos]))
            contracted.append(x.reshape(-1))
        elif v:
            outs.append(x)
    if len(contracted) == 2 and len(contracted[0]) == len(contracted[1]):
        ctx.couple(contracted[0], contracted[1])
    nd = len(out_shape)
    outs = [x.reshape((1,) * (nd - x.ndim) + x.shape) for x in outs]
    if not outs:
        return None
    out = outs[0]
    for x in outs[1:]:
        out = ctx.couple(out, x)
    return out, None


def functional_linear_rule(ctx: RuleContext):
    n = ctx.node
    w = ctx.arg(1, "weight")
    bias = ctx.arg(2, "bias")
    if not isinstance(w, fx.Node) or w.op != "get_attr" or isinstance(bias, fx.Node) and bias.op != "get_attr":
        ctx.freeze_inputs(f"{ctx.describe()} uses a computed weight")
        if ctx.ids(ctx.x) is not None:
            return None
        return None
    wo, wn = _owner(ctx.g.gm, str(w.target))
    pp = [(wo, wn, 0)]
    if isinstance(bias, fx.Node):
        bo, bn_ = _owner(ctx.g.gm, str(bias.target))
        pp.append((bo, bn_, 0))
    del n
    return _linear(ctx, ctx.ids(ctx.x), [(wo, wn, 1)], [], pp, [])


def functional_layernorm_rule(ctx: RuleContext):
    shape = ctx.arg(1, "normalized_shape")
    k = len(shape) if isinstance(shape, (tuple, list)) else 1
    return _layernorm(ctx, k)


def pad_rule(ctx: RuleContext):
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    pad = ctx.arg(1, "pad")
    k = len(pad) // 2 if isinstance(pad, (tuple, list)) else lay.ndim
    if not _spatial_ok(ctx, lay, list(range(lay.ndim - k, lay.ndim))):
        return lay, None
    mode, value = ctx.arg(2, "mode", "constant"), ctx.arg(3, "value", None)
    v = ctx.values(ctx.x)
    if v is not None and mode == "constant" and not value:
        return lay, np.where(v == 0, 0.0, np.nan)
    return lay, None


def ignore_rule(ctx: RuleContext):
    """Ops that read metadata only (dim(), dtype, device)."""
    return None


_BINARY = [operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
           operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
           "add", "sub", "mul", "div", "add_", "mul_", "sub_", "__add__", "__mul__", "__radd__", "__rmul__"]
for _t in _BINARY:
    register_rule(_t, binary_rule)
_UNARY_APPLY = [torch.relu, F.relu, F.relu6, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu, F.silu,
                F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.selu, F.hardtanh, F.mish, F.softplus,
                torch.clamp, torch.exp, operator.neg, torch.neg, F.relu_, torch.relu_,
                "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clamp_", "exp", "neg", "hardtanh",
                "float", "double", "half", "to", "type_as"]
for _t in _UNARY_APPLY:
    register_rule(_t, passthrough("apply"))
for _t in [F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, "contiguous", "clone", "detach",
           torch.clone, torch.detach, "expand_as"]:
    register_rule(_t, passthrough("keep"))


def expand_rule(ctx: RuleContext):
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    if varying(lay):
        ctx.g.rewrite.add(ctx.node)
    nd = len(ctx.shape())
    return lay.reshape((1,) * (nd - lay.ndim) + lay.shape), None


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
for _t in ["dim", "ndimension", len]:
    register_rule(_t, ignore_rule)
for _t in [F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
           F.avg_pool2d, F.max_pool2d, F.avg_pool1d, F.max_pool1d]:
    register_rule(_t, pool_rule)
register_rule(F.interpolate, spatial_keep_rule)
for _t in [torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin", "std", "var",
           torch.std, torch.var]:
    register_rule(_t, reduce_rule)
for _t in [F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax"]:
    register_rule(_t, softmax_fn_rule)
for _t in [torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm"]:
    register_rule(_t, matmul_rule)
register_rule(F.linear, functional_linear_rule)
register_rule(F.layer_norm, functional_layernorm_rule)
register_rule(F.pad, pad_rule)


def stochastic_depth_rule(ctx: RuleContext):
    """torchvision's stochastic depth scales whole samples: channel-local, identity in eval."""
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    v = ctx.values(ctx.x)
    training = ctx.arg(3, "training", True)
    if v is None:
        return lay, None
    return lay, (v if not training else np.where(v == 0, 0.0, np.nan))


try:
    import torchvision.ops as _tvops
    register_rule(_tvops.stochastic_depth, stochastic_depth_rule)
    from torchvision.ops import stochastic_depth as _sd_mod
    register_rule(getattr(_sd_mod, "stochastic_depth", _tvops.stochastic_depth), stochastic_depth_rule)
except Exception:  # torchvision is optional
    pass
