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

The norm is written as plain torch ops (sum, division, rsqrt...), so the shrunk model needs
nothing of surgery's to run, save or export.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

__all__ = ["emit_norm", "emit_mean", "emit_group_norm"]


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
