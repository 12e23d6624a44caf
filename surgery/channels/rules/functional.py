"""Channel rules for reductions, softmax, functions without weights (F.pad, F.normalize, pooling,
interpolation, grid sampling) and torchvision's stochastic depth. See :mod:`surgery.channels.rules`
(the functional forms of layers with weights are :mod:`.layers`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...norms import emit_mean
from ..rulebook import RuleContext, register_rule, varying, when_imported
from .common import _softmax, _spatial_ok, normalised, pool_rule, spatial_keep_rule


def reduce_rule(ctx: RuleContext):
    """``sum``/``mean``/``amax``/``amin``/``std``/``var`` over `dim` (see :func:`_reduce`)."""
    name = getattr(ctx.node.target, "__name__", str(ctx.node.target))
    return _reduce(ctx, name, ctx.arg(1, "dim", None), ctx.arg(2, "keepdim", False))


def norm_rule(ctx: RuleContext):
    """A vector p-norm over `dim` (``x.norm(p, dim)``, ``torch.norm``, ``torch.linalg.vector_norm``
    and ``torch.linalg.norm``; ConvNeXt-V2's global response norm takes one over the positions).
    Over the positions it is channel-local; over the channels, for p >= 0 (``inf`` and "fro"
    too), a removed zero adds nothing, so it reads the kept channels as a sum does. A matrix norm
    other than Frobenius (``linalg.norm(A, ord=2, dim=(0, 1))``, "nuc") or p < 0 is none of these."""
    name = getattr(ctx.node.target, "__name__", str(ctx.node.target))
    linalg = ctx.node.target in (torch.linalg.vector_norm, torch.linalg.norm)
    p = ctx.arg(1, "ord" if linalg else "p", 2 if ctx.node.target is torch.linalg.vector_norm else None)
    dims = ctx.arg(2, "dim", None)
    matrix = ctx.node.target is torch.linalg.norm and isinstance(dims, (tuple, list)) and len(dims) == 2
    elementwise = p in (None, "fro") or isinstance(p, (int, float)) and p >= 0 and not (matrix and p != "fro")
    return _reduce(ctx, "norm" if elementwise else name + f"(p={p!r})", dims, ctx.arg(3, "keepdim", False))


def _reduce(ctx: RuleContext, name: str, dims, keep) -> object:
    """A reduction over `dims`: channel-local over axes no channel varies along, inside each unit
    where channels also vary along kept axes, and across the channels a reader of zeros where a
    removed zero changes nothing (``sum``, ``norm``) or the divisor is kept (``mean``, rewritten
    by Shrink); other reductions across channels freeze them."""
    n = ctx.node
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    if dims is None:
        ctx.freeze(lay, f"{ctx.describe()} reduces over every axis")
        return None
    dims = [d % lay.ndim for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    hit = [d for d in dims if lay.shape[d] > 1]
    if hit and set(varying(lay)) - set(hit):
        # a reduction inside each unit: channels also vary along axes it keeps (a per-head norm
        # over each head's dimensions), so each slice it reduces is one channel
        rep = lay[tuple(slice(0, 1) if d in hit else slice(None) for d in range(lay.ndim))]
        ctx.couple(lay, rep)
        v = ctx.values(ctx.x)
        v = np.where((v == 0).all(axis=tuple(hit), keepdims=True), 0.0, np.nan) if v is not None \
            and name in ("sum", "mean", "amax", "amin", "norm") else None
        squeeze = (lambda t: t) if keep else (lambda t: np.squeeze(t, axis=tuple(dims)))
        return squeeze(rep), (squeeze(v) if v is not None else None)
    if hit:
        if name in ("sum", "norm") and len(varying(lay)) == 1:
            ctx.place("reader", lay, hit[0], arg=0, kind="zero", values=ctx.values(ctx.x))
        elif name == "mean" and varying(lay) == hit and not set(n.kwargs) - {"dim", "keepdim"}:
            # a mean over the channels (an RMSNorm's mean of squares): zeros may go if the mean
            # keeps dividing by the original count (Shrink rewrites it: surgery.norms.emit_mean)
            if not normalised(ctx):
                ctx.freeze(lay, f"{ctx.describe()} counts these channels in its statistics")
                return None
            shape = ctx.shape(ctx.x)
            total = int(np.prod([shape[d] for d in dims]))
            raw_dims, x = ctx.arg(1, "dim", None), ctx.x

            def edit(kept: np.ndarray, n=n, x=x, raw_dims=raw_dims, total=total, keep=keep) -> None:
                emit_mean(n, x, raw_dims, total, bool(keep))
            ctx.place("reader", lay, hit[0], arg=0, kind="zero", values=ctx.values(ctx.x), edit=edit)
            return None
        else:
            ctx.freeze(lay, f"{ctx.describe()} reduces across these channels")
        return None
    out = lay if keep else np.squeeze(lay, axis=tuple(dims))
    v = ctx.values(ctx.x)
    if v is not None:
        v = v if keep else np.squeeze(v, axis=tuple(dims))
        if name in ("sum", "norm"):
            v = np.where(v == 0, 0.0, np.nan)
        elif name not in ("mean", "amax", "amin"):
            v = None
    return out, v


def softmax_fn_rule(ctx: RuleContext):
    return _softmax(ctx, ctx.arg(1, "dim", None))


def pad_rule(ctx: RuleContext):
    """``F.pad(x, pad, mode, value)``: see :func:`_pad`."""
    return _pad(ctx, ctx.arg(1, "pad"), ctx.arg(2, "mode", "constant"), ctx.arg(3, "value", None))


_PAD_MODULES = {cls: mode for name, mode in (("_ConstantPadNd", "constant"), ("_ReflectionPadNd", "reflect"),
                                             ("_ReplicationPadNd", "replicate"), ("_CircularPadNd", "circular"))
                if (cls := getattr(nn.modules.padding, name, None)) is not None}  # _CircularPadNd: torch >= 2.1


def pad_module_rule(ctx: RuleContext):
    """``nn.ZeroPad2d``, ``nn.ConstantPad*d``, ``nn.ReflectionPad*d``... (their forward is F.pad)."""
    m = ctx.module
    mode = next(mode for cls, mode in _PAD_MODULES.items() if isinstance(m, cls))
    return _pad(ctx, m.padding, mode, getattr(m, "value", None))


def _pad(ctx: RuleContext, pad, mode: str, value):
    """Padding of the spatial axes is channel-local. A channel that is zero stays zero where the
    padding is zero or copies the channel's own entries (reflect, replicate, circular, which keep
    any constant)."""
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    k = len(pad) // 2 if isinstance(pad, (tuple, list)) else lay.ndim
    # pad lists (left, right) per axis from the last; an axis padded by (0, 0) is untouched (HF Swin
    # pads the spatial axes of a channels-last map with (0, 0, ...) on the channels)
    listed = isinstance(pad, (tuple, list))
    padded = [lay.ndim - 1 - i for i in range(k) if not listed or any(pad[2 * i:2 * i + 2])]
    if not _spatial_ok(ctx, lay, padded):
        return lay, None
    v = ctx.values(ctx.x)
    if v is not None and mode != "constant":
        return lay, v
    if v is not None and not value:
        return lay, np.where(v == 0, 0.0, np.nan)
    if v is not None and mode == "constant" and value == -math.inf and ctx.node.users and \
            all(_max_pooled_whole(ctx, u) for u in ctx.node.users):
        return lay, v  # every window of the max pool after holds an entry of the channel: a constant stays
    return lay, None


_MAX_POOLS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}


def _max_pooled_whole(ctx: RuleContext, u: fx.Node) -> bool:
    """Whether `u` max-pools the padded `ctx.node` (timm's ``max_pool2d_same``: ``pad_same(x, k,
    value=-inf)`` then ``F.max_pool2d(x, k, s, 0)``) with windows longer than the padding on each
    axis, so that each window holds an entry of the unpadded tensor."""
    nd = _MAX_POOLS.get(u.target) if u.op == "call_function" else None
    before, after = ctx.shape(ctx.x), ctx.shape()
    if nd is None or u.args[0] is not ctx.node or before is None or after is None:
        return False
    kernel, pad = u.args[1] if len(u.args) > 1 else u.kwargs.get("kernel_size"), \
        u.args[3] if len(u.args) > 3 else u.kwargs.get("padding", 0)
    kernel = (kernel,) * nd if isinstance(kernel, int) else tuple(kernel)
    if any(p != 0 for p in ((pad,) * nd if isinstance(pad, int) else pad)) or len(kernel) != nd:
        return False
    added = [a - b for a, b in zip(after[-nd:], before[-nd:])]
    return all(isinstance(k, int) and 0 <= n < k for n, k in zip(added, kernel))


def normalize_rule(ctx: RuleContext):
    """``F.normalize(x, p, dim)``: channel-local when no channels vary along `dim` (XCA normalises
    q and k over the tokens); inside each unit when other axes carry the units too (each slice it
    normalises is then one channel); across the channels alone, a reader of zeros for p > 0 (a
    removed zero changes no p-norm) that keeps its input's channels."""
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    dim = ctx.arg(2, "dim", 1) % lay.ndim
    v = ctx.values(ctx.x)
    zero = np.where(v == 0, 0.0, np.nan) if v is not None else None
    if lay.shape[dim] == 1:
        return lay, zero
    if set(varying(lay)) - {dim}:
        ctx.couple(lay, np.take(lay, [0], axis=dim))
        return lay, None
    p = ctx.arg(1, "p", 2.0)
    if isinstance(p, (int, float)) and p > 0:
        # a zero adds nothing to a p-norm and stays zero (SSD's L2Norm): the kept channels, read
        # where the removed ones are zero, give the same result
        ctx.place("reader", lay, dim, arg=0, kind="zero", values=v)
        ctx.place("local", lay, dim)
        return lay, zero
    ctx.freeze(lay, f"{ctx.describe()} normalises across these channels")
    return None


def grid_sample_rule(ctx: RuleContext):
    """``F.grid_sample(x, grid)`` samples every channel of x (axis 1) at the same points: the
    channels pass through, and a zero one stays zero (out of bounds too). The grid's last axis
    holds coordinates, never channels (Deformable DETR's sampling offsets stay whole)."""
    grid = ctx.node.args[1] if len(ctx.node.args) > 1 else ctx.node.kwargs.get("grid")
    g = ctx.ids(grid) if isinstance(grid, fx.Node) else None
    if g is not None:
        ctx.freeze(g, f"{ctx.describe()} reads these channels as sampling coordinates")
    ids = ctx.ids(ctx.x)
    if ids is None or not _spatial_ok(ctx, ids, list(range(2, ids.ndim))):
        return None
    if ids.shape[0] > 1:  # heads merged into the batch axis, each sampled at its own points: kept whole
        ctx.fix_axis(ids, 0, f"{ctx.describe()} samples each entry of axis 0 at its own points")
    v = ctx.values(ctx.x)
    return ids, (np.where(v == 0, 0.0, np.nan) if v is not None else None)


def ignore_rule(ctx: RuleContext):
    """Ops that read metadata only (dim(), dtype, device)."""
    return None


for _t in [F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
           F.avg_pool2d, F.max_pool2d, F.avg_pool1d, F.max_pool1d]:
    register_rule(_t, pool_rule)
register_rule(F.interpolate, spatial_keep_rule)
register_rule(F.grid_sample, grid_sample_rule)
register_rule(F.normalize, normalize_rule)
for _t in [torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin", "std", "var",
           torch.std, torch.var]:
    register_rule(_t, reduce_rule)
for _t in [torch.norm, torch.linalg.vector_norm, torch.linalg.norm, "norm"]:
    register_rule(_t, norm_rule)
for _t in [F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax"]:
    register_rule(_t, softmax_fn_rule)
register_rule(F.pad, pad_rule)
for _cls in _PAD_MODULES:
    register_rule(_cls, pad_module_rule)
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


def _torchvision_rules() -> None:
    import torchvision.ops as _tvops
    register_rule(_tvops.stochastic_depth, stochastic_depth_rule)
    from torchvision.ops import stochastic_depth as _sd_mod
    register_rule(getattr(_sd_mod, "stochastic_depth", _tvops.stochastic_depth), stochastic_depth_rule)


when_imported("torchvision", _torchvision_rules)  # torchvision is optional, and slow to import

