"""Channel rules for reductions, softmax, functional layers (F.linear, F.layer_norm,
F.pad, pooling, interpolation) and torchvision's stochastic depth. See :mod:`surgery.channels.rules`.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ...norms import emit_group_norm, emit_mean, emit_norm
from ..rulebook import RuleContext, register_rule, varying, when_imported
from .common import (_ConvNd, _layernorm, _linear, _group_norm, _owner, _softmax, _spatial_ok, bn_values,
                     conv_rule, no_folds, normalised, pool_rule, spatial_keep_rule)


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


def functional_linear_rule(ctx: RuleContext):
    n = ctx.node
    w = ctx.arg(1, "weight")
    bias = ctx.arg(2, "bias")
    parts = _bias_parts(bias)
    if not isinstance(w, fx.Node) or w.op != "get_attr" or isinstance(bias, fx.Node) and parts is None:
        ctx.freeze_inputs(f"{ctx.describe()} uses a computed weight")
        return None
    wo, wn = _owner(ctx.g.gm, str(w.target))
    pp = [(wo, wn, 0)]
    if parts is not None and len(parts) == 1:
        pp.append((*_owner(ctx.g.gm, str(parts[0].target)), 0))
    del n
    out = _linear(ctx, ctx.ids(ctx.x), [(wo, wn, 1)], [], pp, [])
    if parts is not None and len(parts) > 1:  # each part of the bias is cut with its outputs
        start = 0
        for part in parts:
            size = part.meta["shape"][0]
            ctx.place("local", out[..., start:start + size], -1, params=[(*_owner(ctx.g.gm, str(part.target)), 0)])
            start += size
    return out


def _bias_parts(bias: object) -> list[fx.Node] | None:
    """The model's tensors a bias is: itself (a get_attr), or those a ``torch.cat`` joins (BEiT's
    ``cat((q_bias, k_bias, v_bias))`` for its fused qkv); None for anything else."""
    if not isinstance(bias, fx.Node):
        return None
    if bias.op == "get_attr":
        return [bias]
    if bias.op == "call_function" and bias.target in (torch.cat, torch.concat) and not bias.kwargs and \
            (len(bias.args) == 1 or bias.args[1] in (0, -1)) and isinstance(bias.args[0], (tuple, list)) and \
            all(isinstance(t, fx.Node) and t.op == "get_attr" and isinstance(t.meta.get("shape"), torch.Size)
                and len(t.meta["shape"]) == 1 for t in bias.args[0]):
        return list(bias.args[0])
    return None


_CASTS = frozenset({"float", "half", "bfloat16", "double", "to", "type_as"})


def _attr_of(ctx: RuleContext, arg: object) -> tuple[torch.nn.Module, str] | None:
    """(owner module, attribute) of an argument read straight from the model (a get_attr node),
    or cast on the way for this one use (DeepSeek's ``rms_norm(x.float(), weight=self.weight.float())``)."""
    if isinstance(arg, fx.Node) and arg.op == "call_method" and arg.target in _CASTS and len(arg.users) == 1 and \
            isinstance(arg.args[0], fx.Node):  # a dtype or device changes no entry's place
        arg = arg.args[0]
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return _owner(ctx.g.gm, str(arg.target))
    return None


_CONV_FUNCTIONS = {F.conv1d: False, F.conv2d: False, F.conv3d: False,
                   F.conv_transpose1d: True, F.conv_transpose2d: True, F.conv_transpose3d: True}


def functional_conv_rule(ctx: RuleContext):
    """``F.conv*d(x, self.weight, self.bias, ...)`` as a conv layer's own forward calls it (timm's
    Conv2dSame pads first; a subclass of nn.Conv3d traced into): the conv module's rule, when the
    weight is a convolution module's own and the call uses the module's groups. A weight computed
    on the way (standardised, scaled) or borrowed from elsewhere freezes the channels."""
    transposed = _CONV_FUNCTIONS[ctx.node.target]
    w, bias = ctx.arg(1, "weight"), ctx.arg(2, "bias")
    groups = ctx.arg(6, "groups", 1)  # the seventh argument of both conv*d and conv_transpose*d
    owner = _attr_of(ctx, w)
    m = owner[0] if owner is not None else None
    own_bias = bias is None and getattr(m, "bias", None) is None or _attr_of(ctx, bias) == (m, "bias")
    if not (isinstance(m, _ConvNd) and owner[1] == "weight" and bool(m.transposed) == transposed and own_bias
            and groups == m.groups):
        why = "a weight computed on the way" if owner is None else f"{owner[1]!r} of {type(m).__name__}"
        ctx.freeze_inputs(f"{ctx.describe()} convolves with {why}, which no conv rule can cut")
        return None
    first = len(ctx.g.places)
    ctx.module = m
    try:
        out = conv_rule(ctx)
    finally:
        ctx.module = None
    no_folds(ctx, first)
    padding = ctx.arg(4, "padding", 0)
    same = tuple(padding) == tuple(m.padding) if isinstance(padding, (tuple, list)) else padding == m.padding
    return (out[0], None) if isinstance(out, tuple) and not same else out


def functional_batch_norm_rule(ctx: RuleContext):
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)`` with
    the tensors a BatchNorm module holds (timm's BatchNormAct2d): channel-local on axis 1."""
    ids = ctx.ids(ctx.x)
    if ids is None:
        return None
    names = ("running_mean", "running_var", "weight", "bias")
    args = [ctx.arg(i + 1, k) for i, k in enumerate(names)]
    attrs = [_attr_of(ctx, a) for a in args]
    if any(a is not None and t is None for a, t in zip(args, attrs)):
        ctx.freeze(ids, f"{ctx.describe()} normalises with statistics computed on the way")
        return ids, None
    params = [(o, k, 0) for o, k in (t for t in attrs if t is not None)]
    owners = {id(o): o for o, _, _ in params}
    m = next(iter(owners.values())) if len(owners) == 1 else None
    # the module's own tensors, every one it has: its count and its constants' values follow it
    bn = isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and \
        all(t == ((m, k) if getattr(m, k, None) is not None else None) for t, k in zip(attrs, names))
    ctx.place("local", ids, 1, params=params, attrs=[(m, "num_features")] if bn else [])
    v = ctx.values(ctx.x)
    if not bn or v is None or ctx.arg(5, "training", False):
        return ids, None
    ctx.module = m
    try:
        return ids, bn_values(ctx, v)
    finally:
        ctx.module = None


def functional_embedding_rule(ctx: RuleContext):
    """``F.embedding(ids, weight, ...)`` on a table read from the model (an Embedding subclass that
    scales its output, Gemma's): each row is a vector of fresh channels, as for nn.Embedding."""
    owner = _attr_of(ctx, ctx.arg(1, "weight"))
    if owner is None:
        return None  # a table computed on the way: its channels are not ours to cut
    m, name = owner
    attrs = [(m, "embedding_dim")] if isinstance(m, torch.nn.Embedding) and name == "weight" else []
    out = ctx.new_space(-1, params=[(m, name, 1)], attrs=attrs)
    if ctx.arg(3, "max_norm") is not None:
        ctx.freeze(out, f"{ctx.describe()} renormalises its rows (max_norm) over all their channels")
    return out


def addmm_rule(ctx: RuleContext):
    """``torch.addmm(bias, x, weight)`` with ``weight`` of shape (in, out) read from the model (the
    Conv1D of Hugging Face's GPT-2): a linear layer with its weight transposed."""
    bias, x, w = (ctx.node.args + (None, None, None))[:3]
    wo, bo = _attr_of(ctx, w), _attr_of(ctx, bias)
    if wo is None or bo is None or ctx.node.kwargs:
        ctx.freeze_inputs(f"{ctx.describe()} multiplies by a weight computed on the way")
        return None
    return _linear(ctx, ctx.ids(x), [(*wo, 0)], [], [(*wo, 1), (*bo, 0)], [], arg=1)


def functional_layernorm_rule(ctx: RuleContext):
    """``F.layer_norm(x, shape, weight, bias, eps)`` / ``F.rms_norm(x, shape, weight, eps)``, with the
    weight and bias read from the model (or none): see :func:`.common._layernorm`. Shrink rewrites
    the call into torch ops that keep the divisor (:func:`surgery.norms.emit_norm`)."""
    node = ctx.node
    rms = node.target is _RMS_NORM
    shape = ctx.arg(1, "normalized_shape")
    k = len(shape) if isinstance(shape, (tuple, list)) else 1
    tensors = {"weight": ctx.arg(2, "weight")} if rms else {"weight": ctx.arg(2, "weight"), "bias": ctx.arg(3, "bias")}
    owned = {k_: _attr_of(ctx, t) for k_, t in tensors.items()}
    if any(t is not None and owned[k_] is None for k_, t in tensors.items()) or k != 1:
        return _layernorm(ctx, k)  # a weight computed on the way: the channels freeze
    params = [(o, a, 0) for o, a in (t for t in owned.values() if t is not None)]
    x, total = ctx.x, int(ctx.shape(ctx.x)[-1])  # the normalised shape's one length (written in, or read: h.shape[-1])
    eps = ctx.arg(3 if rms else 4, "eps", None if rms else 1e-5)

    def edit(kept: np.ndarray) -> None:
        emit_norm(node, x, total, int(kept.sum()), tensors["weight"], tensors.get("bias"), eps, rms)
    return _layernorm(ctx, k, rms=rms, params=params, edit=edit)


_RMS_NORM = getattr(F, "rms_norm", None)  # torch >= 2.4


def functional_group_norm_rule(ctx: RuleContext):
    """``F.group_norm(x, groups, weight, bias, eps)`` with the weight and bias read from the model
    (timm's GroupNorm1 and GroupNorm): see :func:`.common._group_norm`. A weight computed on the
    way freezes the channels."""
    node = ctx.node
    groups = ctx.arg(1, "num_groups")
    tensors = {"weight": ctx.arg(2, "weight"), "bias": ctx.arg(3, "bias")}
    owned = {k: _attr_of(ctx, t) for k, t in tensors.items()}
    shape = ctx.x.meta.get("shape") if isinstance(ctx.x, fx.Node) else None
    if not isinstance(groups, int) or any(t is not None and owned[k] is None for k, t in tensors.items()) or \
            shape is None:
        return _group_norm(ctx)  # the channels freeze
    params = [(o, a, 0) for o, a in (t for t in owned.values() if t is not None)]
    x, total, eps = ctx.x, int(shape[1]), ctx.arg(4, "eps", 1e-5)
    if groups == total and (ids := ctx.ids(x)) is not None:  # each channel alone, as an instance norm
        ctx.place("local", ids, 1, params=params)
        return ids, None

    def edit(kept: np.ndarray) -> None:
        emit_group_norm(node, x, total, int(kept.sum()), tensors["weight"], tensors["bias"], eps, groups)
    return _group_norm(ctx, groups, params, edit)


def pad_rule(ctx: RuleContext):
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    pad = ctx.arg(1, "pad")
    k = len(pad) // 2 if isinstance(pad, (tuple, list)) else lay.ndim
    # pad lists (left, right) per axis from the last; an axis padded by (0, 0) is untouched (HF Swin
    # pads the spatial axes of a channels-last map with (0, 0, ...) on the channels)
    listed = isinstance(pad, (tuple, list))
    padded = [lay.ndim - 1 - i for i in range(k) if not listed or any(pad[2 * i:2 * i + 2])]
    if not _spatial_ok(ctx, lay, padded):
        return lay, None
    mode, value = ctx.arg(2, "mode", "constant"), ctx.arg(3, "value", None)
    v = ctx.values(ctx.x)
    if v is not None and mode == "constant" and not value:
        return lay, np.where(v == 0, 0.0, np.nan)
    return lay, None


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
register_rule(F.linear, functional_linear_rule)
register_rule(F.embedding, functional_embedding_rule)
register_rule(torch.addmm, addmm_rule)
for _t in _CONV_FUNCTIONS:
    register_rule(_t, functional_conv_rule)
register_rule(F.batch_norm, functional_batch_norm_rule)
register_rule(F.layer_norm, functional_layernorm_rule)
register_rule(F.group_norm, functional_group_norm_rule)
if _RMS_NORM is not None:
    register_rule(_RMS_NORM, functional_layernorm_rule)
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


def _torchvision_rules() -> None:
    import torchvision.ops as _tvops
    register_rule(_tvops.stochastic_depth, stochastic_depth_rule)
    from torchvision.ops import stochastic_depth as _sd_mod
    register_rule(getattr(_sd_mod, "stochastic_depth", _tvops.stochastic_depth), stochastic_depth_rule)


when_imported("torchvision", _torchvision_rules)  # torchvision is optional, and slow to import

