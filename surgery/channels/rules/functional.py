"""Channel rules for reductions, softmax, matmul, functional layers (F.linear, F.layer_norm,
F.pad, pooling, interpolation) and torchvision's stochastic depth. See :mod:`surgery.channels.rules`.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..rulebook import RuleContext, register_rule, varying
from .common import _layernorm, _linear, _owner, _softmax, _spatial_ok, pool_rule, spatial_keep_rule


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
for _t in ["dim", "ndimension", len]:
    register_rule(_t, ignore_rule)


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

