"""Channel rules for the layers of libraries that subclass torch.nn layers with a forward of their
own (timm's norm-activation and padded or standardised convolutions), or stand in for one
(Hugging Face's Conv1D, a Linear with its weight transposed), and for functions libraries keep
whole in a traced graph (torchvision Swin's ``_patch_merging_pad``). A subclass that defines
``forward`` never inherits its base's rule (:func:`surgery.channels.groups.find_rule`): each gets
its own here, registered only when the library is installed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from ...norms import REMOVED_STATS, emit_standardised_conv
from ..rulebook import NO_CHANNELS, RuleContext, channel_local, register_rule, varying, when_imported
from .common import (_BN_PARAMS, _linear, bn_values, conv_rule, cut_grouped_inputs, depthwise, group_columns,
                     no_folds, normalised)
from .operands import untracked_operand


def _bn_act_values(ctx: RuleContext, v: np.ndarray) -> np.ndarray | None:
    """A constant channel after BatchNorm, then the module's dropout and activation (both
    element-wise and stateless in eval)."""
    out = bn_values(ctx, v)
    if out is None:
        return None
    t = torch.as_tensor(out, dtype=torch.float64)
    try:
        with torch.no_grad():
            for name in ("drop", "act"):
                layer = getattr(ctx.module, name, None)
                if layer is not None:
                    if layer.training:  # a dropout in training mode: no constant survives it
                        return None
                    t = layer(t)
    except Exception:  # an activation that will not run in float64: forget the constants
        return None
    return t.numpy()


def padded_conv_rule(ctx: RuleContext):
    """A Conv2d that pads itself 'same' before convolving (timm's Conv2dSame): the conv rule, but
    only zero channels may go (a constant's fold would meet the padding at the borders)."""
    first = len(ctx.g.places)
    out = conv_rule(ctx)
    no_folds(ctx, first)
    return (out[0], None) if isinstance(out, tuple) else out


def standardised_conv_rule(ctx: RuleContext):
    """A Conv2d that standardises each filter over its inputs before convolving (timm's StdConv2d,
    ScaledStdConv2d and their ``Same`` forms, of BiT and the NFNets): a filter's statistics, its
    gain and its bias are its own, so output channels may go (as many from each group). A
    depthwise one is channel-local: each filter reads one channel. Otherwise an input channel
    counts in the statistics of every filter that reads it: it may go where it is zero, as
    through a norm (unless ``ChannelPrune(normalised=False)``), and Shrink writes the layer as ops
    that keep the removed weights' statistics (:func:`surgery.norms.emit_standardised_conv`)."""
    m, node = ctx.module, ctx.node
    G, cin = m.groups, m.in_channels
    ids = ctx.ids(ctx.x)
    params = [(m, k, 0) for k in ("weight", "bias", "gain") if getattr(m, k, None) is not None]
    plain = ids is not None and varying(ids) == [1] and len(node.args) == 1 and not node.kwargs
    if G == cin and G > 1 and plain:
        return depthwise(ctx, m, ids, params, scales=False)  # its filters standardised: a constant's output unknown
    cut: dict[str, torch.Tensor] = {}  # the kept output rows, should Shrink edit those before the inputs

    def edit_in(kept: np.ndarray, full: torch.Tensor = m.weight) -> None:
        gone = np.nonzero(~kept.reshape(G, -1))[1].reshape(G, -1)  # each group's removed inputs
        if G > 1:
            cut_grouped_inputs(m, kept, G)
        rows = full if "out" not in cut else full.index_select(0, cut["out"])  # as many of each group
        emit_standardised_conv(node, m, group_columns(rows, G, gone).flatten(1), full[0].numel())

    def edit_out(kept: np.ndarray) -> None:
        cut["out"] = torch.as_tensor(np.flatnonzero(kept))
        for name in REMOVED_STATS:  # the inputs' edit came first: its statistics lose the rows too
            if name in m._buffers:
                m._buffers[name] = m._buffers[name].index_select(0, cut["out"])

    if ids is not None:
        if not plain or not normalised(ctx):
            ctx.freeze(ids, f"{ctx.describe()} standardises each filter over all its input channels")
        else:
            ctx.place("reader", ids, 1, arg=0, params=[(m, "weight", 1)] if G == 1 else [],
                      attrs=[(m, "in_channels")] if G == 1 else [], kind="zero", groups=G, edit=edit_in,
                      values=ctx.values(ctx.x))
    return ctx.new_space(1, params=params, attrs=[(m, "out_channels")], edit=edit_out, groups=G)


def transposed_linear_rule(ctx: RuleContext):
    """Hugging Face's Conv1D: ``x @ weight + bias`` with weight (in, out)."""
    m = ctx.module
    return _linear(ctx, ctx.ids(ctx.x), [(m, "weight", 0)], [], [(m, "weight", 1), (m, "bias", 0)], [(m, "nf")])


def _transformers_rules() -> None:
    from transformers.pytorch_utils import Conv1D as _HFConv1D
    register_rule(_HFConv1D, transposed_linear_rule)


def _timm_rules() -> None:
    from timm import layers as _timm_layers
    for name in ("BatchNormAct2d", "SyncBatchNormAct"):
        if hasattr(_timm_layers, name):
            register_rule(getattr(_timm_layers, name),
                          channel_local(_BN_PARAMS, attrs=("num_features",), values=_bn_act_values))
    if hasattr(_timm_layers, "Conv2dSame"):
        register_rule(_timm_layers.Conv2dSame, padded_conv_rule)
    for name in ("StdConv2dSame", "ScaledStdConv2dSame", "StdConv2d", "ScaledStdConv2d"):
        if hasattr(_timm_layers, name):
            register_rule(getattr(_timm_layers, name), standardised_conv_rule)
    from timm.layers import _fx as _timm_fx
    for fn in list(_timm_fx.get_notrace_functions()):
        if getattr(fn, "__name__", "") in _REARRANGING:
            register_rule(fn, rearranging_rule)
        elif getattr(fn, "__name__", "") == "maybe_add_mask":
            register_rule(fn, maybe_add_mask_rule)
        elif getattr(fn, "__name__", "") == "global_pool_naflex":
            register_rule(fn, token_pool_rule)


# optional libraries, slow to import: their rules are registered once a model of theirs is loaded
when_imported("transformers.pytorch_utils", _transformers_rules)
when_imported("timm.layers", _timm_rules)


def patch_merging_rule(ctx: RuleContext):
    """torchvision Swin's ``_patch_merging_pad(x)``: x (..., H, W, C) padded with zeros to even
    sides, its four 2x2 phases joined on the channels, (..., H/2, W/2, 4C): each channel four times."""
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    if varying(lay) != [lay.ndim - 1]:
        ctx.freeze(lay, f"{ctx.describe()} moves entries along axes other than the channels")
        return None
    v = ctx.values(ctx.x)
    return np.concatenate([lay] * 4, axis=-1), (np.concatenate([np.where(v == 0, 0.0, np.nan)] * 4, axis=-1)
                                                if v is not None else None)


def _swin_rules() -> None:
    from torchvision.models import swin_transformer as _tv_swin
    if hasattr(_tv_swin, "_patch_merging_pad"):
        register_rule(_tv_swin._patch_merging_pad, patch_merging_rule)


def _swin3d_rules() -> None:
    from torchvision.models.video import swin_transformer as _tv_swin3d
    if hasattr(_tv_swin3d, "_compute_attention_mask_3d"):
        # builds the shifted windows' mask from sizes; its tensor argument only lends dtype and device
        register_rule(_tv_swin3d._compute_attention_mask_3d, lambda ctx: NO_CHANNELS)


# torchvision is optional, and slow to import: registered once a model of it is loaded
when_imported("torchvision.models.swin_transformer", _swin_rules)
when_imported("torchvision.models.video.swin_transformer", _swin3d_rules)


def rearranging_rule(ctx: RuleContext):
    """A library function that only moves entries between the other axes (timm's window_reverse,
    grid_reverse, nest's deblockify): channels varying along one axis stay on it, when the output
    has the same rank and that axis the same length, or when it is the last axis of both (GCViT's
    window_reverse takes (windows, tokens, C) to (B, H, W, C)). Else they freeze."""
    lay, shape_in, shape_out = ctx.ids(ctx.x), ctx.shape(ctx.x), ctx.shape()
    if lay is None:
        return None
    v = varying(lay)
    if len(v) == 1 and shape_in is not None and shape_out is not None and v[0] == len(shape_in) - 1 \
            and len(shape_out) != len(shape_in) and shape_in[-1] == shape_out[-1]:
        vals = ctx.values(ctx.x)
        out = [1] * (len(shape_out) - 1) + [shape_in[-1]]
        return lay.reshape(out), (None if vals is None else np.broadcast_to(vals, lay.shape).reshape(out))
    if len(v) != 1 or shape_in is None or shape_out is None or len(shape_in) != len(shape_out) \
            or shape_in[v[0]] != shape_out[v[0]]:
        ctx.freeze(lay, f"{ctx.describe()} moves these channels in a way the rules cannot follow")
        return None
    return lay, ctx.values(ctx.x)


def maybe_add_mask_rule(ctx: RuleContext):
    """timm's ``maybe_add_mask(scores, mask)``: the scores, plus the mask where there is one."""
    lay = ctx.ids(ctx.x)
    mask = ctx.arg(1, "attn_mask")
    if lay is None:
        return None
    if isinstance(mask, fx.Node):
        untracked_operand(ctx, mask, lay, lay.ndim)
    return lay, None


def token_pool_rule(ctx: RuleContext):
    """timm's ``global_pool_naflex(x, patch_valid, pool_type, ...)``: x (B, N, C) pooled over its
    tokens (the valid ones, or the class token alone) to (B, C), each channel alone; a zero channel
    stays zero."""
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    if lay.ndim != 3 or lay.shape[1] > 1:
        ctx.freeze(lay, f"{ctx.describe()} pools over the axis these channels vary along")
        return None
    v = ctx.values(ctx.x)
    return lay[:, 0], (np.where(v[:, 0] == 0, 0.0, np.nan) if v is not None and v.ndim == 3 else None)


_REARRANGING = {"window_reverse", "window_reverse_nchw", "grid_reverse", "grid_reverse_nchw", "deblockify",
                "window_partition", "window_partition_nchw", "grid_partition", "grid_partition_nchw", "blockify"}
