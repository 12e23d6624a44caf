"""Norms that keep their original divisor: what Shrink writes into the graph for a LayerNorm or
an RMSNorm (over the last axis) or a one-group GroupNorm (over all but the batch axis) whose
stream lost channels.

A channel that is exactly zero at a norm's input may be removed through the norm if the norm
still divides by the original width D:

- RMSNorm: the mean of squares over D is the sum over the K kept channels divided by D.
- LayerNorm: the mean works the same way; the variance also needs the removed channels'
  ``(0 - mean)^2`` terms: ``var = (sum over kept of (x - mean)^2 + (D - K) * mean^2) / D``.

(A LayerNorm's output at a removed channel is not zero, ``(0 - mean) / std * w + b``: the
channel analysis places a mask after the norm too, so readers see zero there.)

The same holds for a convolution that standardises each filter over its inputs (timm's
StdConv2d and ScaledStdConv2d, of BiT and the NFNets) when some inputs go: a filter's mean and
variance are over all its original weights, so the removed ones' statistics stay with the layer
(:func:`emit_standardised_conv`).

The norm is written as plain torch ops (sum, division, rsqrt...), so the shrunk model needs
nothing of surgery's to run, save or export.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

__all__ = ["emit_norm", "emit_mean", "emit_group_norm", "emit_standardised_conv", "REMOVED_STATS"]


def emit_norm(node: fx.Node, x: fx.Node, total: int, kept: int, weight: Any, bias: Any, eps: float | None,
              rms: bool) -> None:
    """Turn `node` (a norm over the last axis of `x`, which keeps `kept` of its `total` channels)
    into torch ops that normalise as over all `total`, the missing ones being zero. `weight` and `bias` are nodes (or
    None); ``eps=None`` is the dtype's machine epsilon (as ``F.rms_norm``'s). `node` itself
    becomes the last op, so every reference to it stays valid."""
    g = node.graph
    dtype = node.meta.get("dtype")
    if eps is None:
        eps = torch.finfo(dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32).eps
    with g.inserting_before(node):
        if rms:
            square = g.call_method("pow", (x, 2))
            mean_square = g.call_function(operator.truediv, (g.call_method("sum", (square, -1), {"keepdim": True}),
                                                             total))
            out = g.call_function(operator.mul, (x, g.call_method("rsqrt", (g.call_function(
                operator.add, (mean_square, eps)),))))
        else:
            mean = g.call_function(operator.truediv, (g.call_method("sum", (x, -1), {"keepdim": True}), total))
            centred = g.call_function(operator.sub, (x, mean))
            spread = g.call_method("sum", (g.call_method("pow", (centred, 2)), -1), {"keepdim": True})
            gone = g.call_function(operator.mul, (g.call_method("pow", (mean, 2)), float(total - kept)))
            var = g.call_function(operator.truediv, (g.call_function(operator.add, (spread, gone)), total))
            out = g.call_function(operator.mul, (centred, g.call_method("rsqrt", (g.call_function(
                operator.add, (var, eps)),))))
    _affine(node, out, weight, None if rms else bias)


def _affine(node: fx.Node, out: fx.Node, weight: Any, bias: Any) -> None:
    """``out * weight + bias`` (either may be None), the last op written into `node` itself, so
    every reference to `node` stays valid."""
    g = node.graph
    steps = [(op, t) for op, t in ((operator.mul, weight), (operator.add, bias)) if t is not None]
    with g.inserting_before(node):
        for op, t in steps[:-1]:
            out = g.call_function(op, (out, t))
    if steps:
        node.op, node.target, node.args, node.kwargs = "call_function", steps[-1][0], (out, steps[-1][1]), {}
    else:
        node.op, node.target, node.args, node.kwargs = "call_method", "contiguous", (out,), {}


def emit_mean(node: fx.Node, x: fx.Node, dims: Any, total: int, keepdim: bool) -> None:
    """Turn `node` (``x.mean(dims)`` over channels some of which are gone, all zero) into the
    sum over `dims` divided by the original count `total`."""
    g = node.graph
    with g.inserting_before(node):
        summed = g.call_method("sum", (x, dims), {"keepdim": keepdim})
    node.op, node.target, node.args, node.kwargs = "call_function", operator.truediv, (summed, total), {}


def emit_group_norm(node: fx.Node, x: fx.Node, total: int, kept: int, weight: Any, bias: Any, eps: float,
                    groups: int = 1) -> None:
    """Turn `node` (a GroupNorm of `groups` groups, its channels on axis 1 of `x`, `kept` of
    `total` left, as many in every group) into torch ops that normalise each group as over all
    its channels: with ``r = kept / total``, a group's mean is r times its kept channels' mean,
    and its variance r times theirs about that mean plus ``(1 - r) * mean^2`` for the removed
    zeros. Means, not sums, so no spatial size is written in; several groups are split off axis 1
    (``unflatten``) and joined again. `weight` and `bias` (nodes or None) are per channel."""
    g = node.graph
    shape = x.meta.get("shape")
    nd = len(shape) if shape is not None else 4
    r = kept / total
    per_channel = (-1,) + (1,) * (nd - 2)
    with g.inserting_before(node):
        if groups > 1:
            x = g.call_method("unflatten", (x, 1, (groups, kept // groups)))
        dims = tuple(range(2 if groups > 1 else 1, nd + (groups > 1)))
        mean = g.call_function(operator.mul, (g.call_method("mean", (x, dims), {"keepdim": True}), r))
        centred = g.call_function(operator.sub, (x, mean))
        spread = g.call_function(operator.mul, (g.call_method("mean", (g.call_method("pow", (centred, 2)), dims),
                                                              {"keepdim": True}), r))
        var = g.call_function(operator.add, (spread, g.call_function(operator.mul, (
            g.call_method("pow", (mean, 2)), 1.0 - r))))
        out = g.call_function(operator.mul, (centred, g.call_method("rsqrt", (g.call_function(
            operator.add, (var, eps)),))))
        if groups > 1:
            out = g.call_method("flatten", (out, 1, 2))
        weight, bias = (g.call_method("reshape", (t, per_channel)) if t is not None else None for t in (weight, bias))
    _affine(node, out, weight, bias)


REMOVED_STATS = ("standardised_removed_mean", "standardised_removed_m2")  # buffers of a cut standardised conv


def emit_standardised_conv(node: fx.Node, conv: torch.nn.Conv2d, gone: torch.Tensor, total: int) -> None:
    """Turn `node`, a call of `conv` (timm's StdConv2d, ScaledStdConv2d or their ``Same`` forms:
    each filter standardised over its ``total`` weights, ``F.batch_norm(w.reshape(1, out, -1),
    training=True)``, then a Conv2d), whose inputs Shrink cut, into torch ops that standardise each
    filter as over all its original weights. `gone`: the removed weights, (out, removed). Their
    mean and sum of squared deviations per filter become buffers of `conv`
    (:data:`REMOVED_STATS`); for a filter mean m over all weights,

        sum over removed of (w - m)^2 = m2_removed + n_removed * (mean_removed - m)^2,

    so the layer keeps the exact statistics while training moves its kept weights (the removed
    ones held where they were). `node` itself becomes the ``F.conv2d`` call."""
    g = node.graph
    gone = gone.detach().double()
    n_gone = gone.shape[1]
    mean_gone = gone.mean(1, keepdim=True)
    m2_gone = (gone - mean_gone).pow(2).sum(1, keepdim=True)
    for name, t in zip(REMOVED_STATS, (mean_gone, m2_gone)):
        conv.register_buffer(name, t.to(conv.weight.dtype))
    target, x = str(node.target), node.args[0]
    with g.inserting_before(node):
        w = g.get_attr(f"{target}.weight")
        mean_r, m2_r = (g.get_attr(f"{target}.{name}") for name in REMOVED_STATS)
        flat = g.call_method("flatten", (w, 1))
        summed = g.call_method("sum", (flat, 1), {"keepdim": True})
        mean = g.call_function(operator.truediv, (g.call_function(operator.add, (
            summed, g.call_function(operator.mul, (mean_r, float(n_gone))))), total))
        centred = g.call_function(operator.sub, (flat, mean))
        spread = g.call_method("sum", (g.call_method("pow", (centred, 2)), 1), {"keepdim": True})
        apart = g.call_function(operator.mul, (g.call_method("pow", (g.call_function(
            operator.sub, (mean_r, mean)), 2)), float(n_gone)))
        var = g.call_function(operator.truediv, (g.call_function(operator.add, (g.call_function(
            operator.add, (spread, m2_r)), apart)), total))
        std_w = g.call_function(operator.mul, (centred, g.call_method("rsqrt", (g.call_function(
            operator.add, (var, float(conv.eps))),))))
        if getattr(conv, "gain", None) is not None:  # ScaledStdConv2d: batch_norm's weight, gain * scale
            gain = g.call_method("reshape", (g.get_attr(f"{target}.gain"), (-1, 1)))
            std_w = g.call_function(operator.mul, (std_w, g.call_function(operator.mul, (gain, float(conv.scale)))))
        std_w = g.call_method("reshape_as", (std_w, w))
        if getattr(conv, "same_pad", False):
            from timm.layers.padding import pad_same  # the layer is timm's: timm is there
            x = g.call_function(pad_same, (x, tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation)))
        bias = g.get_attr(f"{target}.bias") if conv.bias is not None else None
    node.op, node.target, node.kwargs = "call_function", torch.nn.functional.conv2d, {}
    node.args = (x, std_w, bias, tuple(conv.stride), conv.padding if isinstance(conv.padding, str) else
                 tuple(conv.padding), tuple(conv.dilation), conv.groups)
