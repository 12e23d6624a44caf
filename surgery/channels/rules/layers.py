"""Channel rules for the functional forms of layers with weights (``F.linear``, ``F.conv*d``,
``F.batch_norm``, ``F.embedding``, ``torch.addmm``, ``F.layer_norm``, ``F.rms_norm``,
``F.group_norm``), where the weights are the model's own, read through ``get_attr`` (and maybe
cast on the way): the rules of their modules, the tensors named by attribute. A weight computed
on the way freezes the channels. See :mod:`surgery.channels.rules`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ...norms import emit_group_norm, emit_norm
from ..rulebook import RuleContext, register_rule
from .common import _ConvNd, _group_norm, _layernorm, _linear, _owner, bn_values, conv_rule, no_folds


def functional_linear_rule(ctx: RuleContext):
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
    if groups != 1:  # a depthwise layer's edit sets the module's new groups: the call's own goes with it
        for p in ctx.g.places[first:]:
            if p.edit is not None:
                p.edit = _with_groups(p.edit, ctx.node, m)
    padding = ctx.arg(4, "padding", 0)
    same = tuple(padding) == tuple(m.padding) if isinstance(padding, (tuple, list)) else padding == m.padding
    return (out[0], None) if isinstance(out, tuple) and not same else out


def _with_groups(edit, node: fx.Node, m: torch.nn.Module):
    """`edit`, then the call `node` given `m`'s groups (the seventh argument, or ``groups=``)."""
    def both(kept: np.ndarray) -> None:
        edit(kept)
        if "groups" in node.kwargs:
            node.update_kwarg("groups", m.groups)
        elif len(node.args) > 6:
            node.update_arg(6, m.groups)
    return both


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
