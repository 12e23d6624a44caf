"""The standard channel rules for modules and masks: how each op moves channels (see
surgery.channels). Tensor functions and methods are in :mod:`.tensor`, reductions, matmul and
functional layers in :mod:`.functional`, shared pieces in :mod:`.common`.

Each rule takes a :class:`~surgery.channels.RuleContext` and returns the output layout, or
``(layout, values)`` where `values` are per-entry constants a channel is known to hold (nan =
unknown) so Shrink can tell a removed channel's readers see zero (or a foldable constant).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...layers import ELEMENTWISE, PASSING
from ...norms import emit_group_norm, emit_norm
from ..rulebook import NO_CHANNELS, RuleContext, channel_local, passthrough, register_rule, varying, when_imported
from .common import (_BN_PARAMS, _layernorm, _linear, _group_norm, _owner, _reads_last_axis, _softmax, _vals,
                     bn_values, conv_rule, pool_rule, reshape_rule, spatial_keep_rule)


# ----------------------------------------------------------------------------------------- masks
def mask_rule(ctx: RuleContext):
    """A UnitMask: channel-local along ``mask.dim``; a zero factor makes the channel zero."""
    m = ctx.module
    ctx.g.mask_nodes.append(ctx.node)
    ids = ctx.ids(ctx.x)
    if ids is None:
        return None
    dim = ctx.node.kwargs.get("dim", m.dim) % ids.ndim  # a call may name its own axis
    v = _vals(ctx, ctx.x, ids)
    runs = ctx.node.kwargs.get("runs")  # some of the units only: their factors
    f = m.factors_at(ids.shape[dim], runs=runs).double().cpu().numpy()
    tile, each = ctx.node.kwargs.get("tile", 1), ctx.node.kwargs.get("each", 1)
    if max(tile, each) > 1 and ids.shape[dim] == len(f) * max(tile, each):
        # the units `tile` times over on the axis, or each `each` times in a row: one factor for
        # each unit's copies, one channel
        units_at = range(len(f)) if tile > 1 else range(0, len(f) * each, each)
        first = np.take(ids, units_at, axis=dim)
        ctx.couple(ids, np.concatenate([first] * tile, axis=dim) if tile > 1 else np.repeat(first, each, axis=dim))
        f = np.tile(f, tile) if tile > 1 else np.repeat(f, each)
    else:
        units_at = None
    if ids.shape[dim] != len(f):
        if ids.shape[dim] == 1 and not any(s > 1 for s in ids.shape):
            pass  # one channel broadcast: the mask scales positions we do not track
        return ids, None
    if any(s > 1 for d, s in enumerate(ids.shape) if d != dim):
        # a mask over attention heads: it zeroes whole slices, so each slice's elements are one
        # channel (the attention rules coupled them already)
        line = np.moveaxis(np.moveaxis(ids, dim, 0).reshape(len(f), -1)[:, :1], 0, -1)
        line = line.reshape([len(f) if d == dim else 1 for d in range(ids.ndim)])
        ctx.couple(ids, line)
    else:
        line = ids
    shape = [1] * ids.ndim
    shape[dim] = len(f)
    fb = f.reshape(shape)
    out = np.where(fb == 0, 0.0, v * fb)
    ctx.place("mask", line if units_at is None else np.take(line, units_at, axis=dim), dim)
    return ids, out


# ----------------------------------------------------------------------------------------- modules
def linear_rule(ctx: RuleContext):
    m = ctx.module
    ids = ctx.ids(ctx.x)
    bias = [(m, "bias", 0)]  # always: a constant fold may add a bias later
    return _linear(ctx, ids, [(m, "weight", 1)], [(m, "in_features")],
                   [(m, "weight", 0), *bias], [(m, "out_features")])


def rnn_rule(ctx: RuleContext):
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` read their input's features through the first layer's
    input weights (both directions'): a reader, whose columns go with the channels, a zero one
    adding nothing to any gate. The hidden units feed back into the recurrence, which a mask after
    the output cannot cut exactly: the outputs carry no channels of ours."""
    m = ctx.module
    ids = ctx.ids(ctx.x)
    if ids is not None and varying(ids):
        params = [(m, "weight_ih_l0", 1)] + ([(m, "weight_ih_l0_reverse", 1)] if m.bidirectional else [])
        _reads_last_axis(ctx, ids, params, [(m, "input_size")])
    return NO_CHANNELS


def embedding_rule(ctx: RuleContext):
    """Embedding / EmbeddingBag: each row of the table is a vector of fresh channels (the last
    axis of the output); the integer input carries none. A max_norm table renormalises its rows
    by their norm over every channel, so its channels stay."""
    m = ctx.module
    out = ctx.new_space(-1, params=[(m, "weight", 1)], attrs=[(m, "embedding_dim")])
    if m.max_norm is not None:
        ctx.freeze(out, f"{ctx.describe()} renormalises its rows (max_norm) over all their channels")
    return out


_TABLE_VIEWS = frozenset({"unsqueeze", "expand", "repeat", "view", "reshape", torch.unsqueeze, torch.reshape})


def table_rule(ctx: RuleContext):
    """A get_attr that reads an Embedding's whole table as activations: DeBERTa's relative-position
    table, normalised and projected like the hidden states; DETR's object queries, repeated per
    image and added to the decoder's stream. Each row is a vector of the table's channels, on the
    last axis, as the Embedding's lookups give them (one decision with those, through the weight
    they slice). Only where every use takes the table as an input to a module or to a view or
    repeat of it: other reads (a tied output head's ``weight.t()``, a weight handed to a functional
    layer) are the rules' business as they always were, through the parameter they read."""
    owner, name = _owner(ctx.g.gm, str(ctx.node.target))
    shape = ctx.shape()
    if not isinstance(owner, nn.Embedding) or name != "weight" or owner.max_norm is not None or \
            shape is None or tuple(shape) != tuple(owner.weight.shape) or not ctx.node.users:
        return None
    node = ctx.node
    for u in node.users:
        viewed = u.op in ("call_method", "call_function") and u.target in _TABLE_VIEWS and u.args and \
            u.args[0] is node and node not in u.args[1:] and node not in u.kwargs.values()
        if not (u.op == "call_module" or viewed):
            return None
    return ctx.new_space(-1, params=[(owner, "weight", 1)], attrs=[(owner, "embedding_dim")])


def instancenorm_values(ctx: RuleContext, v: np.ndarray):
    m = ctx.module
    if getattr(m, "track_running_stats", False):
        return bn_values(ctx, v)
    b = m.bias.detach().double().numpy() if getattr(m, "bias", None) is not None else np.zeros(v.shape[1])
    if len(b) != v.shape[1]:
        return None
    # a constant channel normalises to zero, then the affine bias
    return np.where(np.isnan(v), np.nan, b.reshape([1, -1] + [1] * (v.ndim - 2)))


def groupnorm_rule(ctx: RuleContext):
    m = ctx.module
    ids = ctx.ids(ctx.x)
    if ids is None:
        return None
    if m.num_groups < m.num_channels and len(ctx.node.args) == 1 and not ctx.node.kwargs:
        ps = [(m, k, 0) for k in ("weight", "bias") if getattr(m, k, None) is not None]
        return _group_norm(ctx, m.num_groups, ps, _group_norm_over_original_width(ctx.node, m))
    if m.num_groups != m.num_channels:
        ctx.freeze(ids, f"{ctx.describe()} normalises {m.num_channels // m.num_groups} channels together")
        return ids, None
    ps = [(m, k, 0) for k in ("weight", "bias") if getattr(m, k, None) is not None]
    ctx.place("local", ids, 1, params=ps, attrs=[(m, "num_channels"), (m, "num_groups")])
    return ids, instancenorm_values(ctx, _vals(ctx, ctx.x, ids))


def _group_norm_over_original_width(node, m: nn.GroupNorm):
    """Shrink's edit for a GroupNorm module whose input lost channels, as many from each group
    (:func:`surgery.norms.emit_group_norm`)."""
    def emit(x, total, k, w, b) -> None:
        emit_group_norm(node, x, total, k, w, b, m.eps, m.num_groups)
        m.num_channels = k
    return _over_original_width(node, m, int(m.num_channels), emit)


def _norm_over_original_width(node, m: nn.Module, rms: bool):
    """Shrink's edit for a LayerNorm/RMSNorm module whose input lost channels
    (:func:`surgery.norms.emit_norm`)."""
    def emit(x, total, k, w, b) -> None:
        emit_norm(node, x, total, k, w, b, m.eps, rms)
        m.normalized_shape = (k,)
    return _over_original_width(node, m, int(m.normalized_shape[0]), emit)


def _over_original_width(node, m: nn.Module, total: int, emit):
    """Shrink's edit for a norm module's call whose input lost channels: the call becomes torch
    ops that divide by the original width `total`, reading the module's weight and bias (already
    cut); the module stays where it was, holding them. ``emit(x, total, kept, weight, bias)``
    writes the ops and sets the module's new width."""
    x = node.args[0]

    def edit(kept: np.ndarray) -> None:
        g = node.graph
        with g.inserting_before(node):
            w, b = (g.get_attr(f"{node.target}.{t}") if getattr(m, t, None) is not None else None
                    for t in ("weight", "bias"))
        emit(x, total, int(kept.sum()), w, b)
    return edit


def layernorm_rule(ctx: RuleContext):
    m = ctx.module
    params = [(m, k, 0) for k in ("weight", "bias") if getattr(m, k, None) is not None]
    rms = _RMSNorm is not None and isinstance(m, _RMSNorm)
    edit = _norm_over_original_width(ctx.node, m, rms) if len(ctx.node.args) == 1 and not ctx.node.kwargs else None
    return _layernorm(ctx, len(m.normalized_shape), rms=rms, params=params, edit=edit)


_RMSNorm = getattr(nn, "RMSNorm", None)  # torch >= 2.4


def softmax_module_rule(ctx: RuleContext):
    return _softmax(ctx, ctx.module.dim)


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
for _cls in (nn.LSTM, nn.GRU, nn.RNN):
    register_rule(_cls, rnn_rule)
register_rule(nn.Embedding, embedding_rule)
register_rule(nn.EmbeddingBag, embedding_rule)
register_rule(nn.modules.batchnorm._BatchNorm,
              channel_local(_BN_PARAMS, attrs=("num_features",), values=bn_values))
register_rule(nn.modules.instancenorm._InstanceNorm,
              channel_local(_BN_PARAMS, attrs=("num_features",), values=instancenorm_values))
register_rule(nn.GroupNorm, groupnorm_rule)
register_rule(nn.LayerNorm, layernorm_rule)
if _RMSNorm is not None:
    register_rule(_RMSNorm, layernorm_rule)
for _cls in ELEMENTWISE:
    register_rule(_cls, passthrough("apply"))
for _cls in PASSING:
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
def _torchvision_rules() -> None:
    from torchvision.ops.misc import Permute as _TvPermute
    register_rule(_TvPermute, permute_module_rule)


when_imported("torchvision", _torchvision_rules)  # torchvision is optional, and slow to import
register_rule(nn.Flatten, reshape_rule)

