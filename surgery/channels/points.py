"""Where one shared mask realises a channel group: after each producer and the chain of
channel-local ops that ends it (its BatchNorm, activation, dropout), as far as that chain is the
producer's only reader; on the head axis of attention's output for attention heads. See
:func:`mask_points`.
"""
from __future__ import annotations

import operator
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..graph import submodule
from ..pipeline import UnitMask
from .rulebook import is_reshape

__all__ = ["MaskPoint", "mask_points", "data_users", "is_trailing", "adds_parameter"]


class MaskPoint(NamedTuple):
    """A mask's call after `node`, its units on axis `dim` (from the end where the node's rank is
    known); `runs` where the axis carries some of the group's channels, ``((a, b), ...)``: channels
    a .. b - 1, then the next run's (see :class:`surgery.pipeline.UnitMask`); None where it carries
    all of them in order (`each` times in a row each, or in the group's order several times over:
    the call's ``tile``, which :func:`passes._placement.axis_kwargs` reads off the shapes)."""

    node: fx.Node
    dim: int
    runs: Optional[tuple[tuple[int, int], ...]] = None
    each: int = 1  # the axis holds each channel `each` times in a row


def mask_points(group) -> list[MaskPoint]:
    """Where one shared per-channel mask of ``group.size`` units realises the group: after each
    producer and its trailing single-user BN/activation chain, and after each op that adds a
    parameter of the model to the channels (a position embedding: ``x + pos`` is not zero where
    x is) or shifts them (a BatchNorm on the stream, a Linear with a bias over the tokens).

    Producers that carry every channel of the group in group order (or in group order several
    times over) take the whole mask (convolutional and residual streams); one
    that carries runs of the group's channels and nothing else takes those runs of the mask (the
    layers of a dense block, whose concatenation one norm reads; DPN's 1x1 conv, split between
    its residual and its dense path: :func:`_runs`); one that carries each channel k times in a
    row takes the mask with ``each=k`` (a grouped convolution making k outputs of each input
    channel: FastViT's and PiT's downsampling). Where a producer carries channels otherwise
    (each attention head spans head_dim outputs of q, k and v), the points the rules recorded
    serve instead (a head axis: :mod:`.rules.attention`), else the readers' inputs
    (:func:`_reader_points`); a frozen group has none.
    """
    if group.frozen:
        return []
    whole = lambda p: len(p.channels) == group.size and np.array_equal(p.channels, np.arange(group.size))  # noqa: E731
    cover = {id(p): _cover(p, group.size) for p in group.producers}
    if any(c != (None, 1) for c in cover.values()):
        # the points the rules recorded come first: a head's q, k and v outputs hold each head
        # head_dim times in a row, but zeros there do not take the head out of the scores
        heads = [MaskPoint(p.node, p.dim - len(p.node.meta["shape"])) for p in group.points if whole(p)]
        if heads:
            # a norm over the merged heads (BEiT-3's scale norm before the projection) makes a
            # masked head's channels its bias again: a mask after it too, each head's width in a row
            after = [MaskPoint(p.node, p.dim - len(p.node.meta["shape"]), *cover[id(p)]) for p in group.producers
                     if cover[id(p)] is not None and isinstance(p.node.meta.get("shape"), torch.Size)
                     and _downstream(p.node, {pt.node for pt in heads})]
            return list(dict.fromkeys(heads + after))
        if any(c is None for c in cover.values()):
            return _reader_points(group, whole)
    added = [p for p in group.locals if p.params and (adds_parameter(p.node) or _shifts(p))] + group.shifts
    cover.update({id(p): _cover(p, group.size) for p in added})
    points = []
    for p in group.producers + [p for p in added if cover[id(p)] is not None]:
        node = p.node
        while len(users := data_users(node)) == 1:
            if not is_trailing(users[0], node):
                break
            node = users[0]
        dim = p.dim
        shape = node.meta.get("shape")
        if isinstance(shape, torch.Size) and dim >= 0:
            dim = dim - len(shape)  # from the end, so one mask fits any batch shape
        points.append(MaskPoint(node, dim, *cover[id(p)]))
    return list(dict.fromkeys(points))


def _cover(p, size: int) -> tuple[Optional[tuple[tuple[int, int], ...]], int] | None:
    """How a mask's call covers a place's axis: ``(runs, each)`` for :class:`MaskPoint`, None
    where no call can (see :func:`mask_points`). The group's channels in order, k times over
    (k = 1: the group whole; Swin's patch merging joins four copies: the call's ``tile``), or each
    k times in a row, take the whole mask."""
    c = p.channels
    k = len(c) // size if size else 0
    if k and len(c) == k * size:
        units = np.arange(size)
        if np.array_equal(c, np.tile(units, k)):
            return None, 1
        if np.array_equal(c, np.repeat(units, k)):
            return None, k
    runs = _runs(p)
    return (runs, 1) if runs else None


_MAX_RUNS = 16  # more, and a mask's call would spell out a scatter of channels: no mask there


def _runs(p) -> tuple[tuple[int, int], ...]:
    """The runs of consecutive group channels a place's axis holds, ``((a, b), ...)`` for channels
    a .. b - 1, where it holds the group's channels only, in at most :data:`_MAX_RUNS` runs; () otherwise."""
    c = p.channels
    if len(c) == 0 or (c < 0).any():
        return ()
    cuts = np.flatnonzero(np.diff(c) != 1) + 1
    if len(cuts) >= _MAX_RUNS:
        return ()
    starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(c)]])
    return tuple((int(c[s]), int(c[e - 1]) + 1) for s, e in zip(starts, ends))


def _shifts(p) -> bool:
    """A channel-local op with a bias on the stream (RepVGG's identity-branch BatchNorm, a
    pre-activation norm, a depthwise conv with a bias as a position encoding): it maps a zero
    channel to a constant, so the group's mask goes after it too. After a producer it is part of
    that producer's chain, and the two points are one."""
    return any(name == "bias" for _, name, _ in p.params)


def _reader_points(group, whole) -> list[MaskPoint]:
    """Where no producer carries the group whole (a fused projection split into parts: Phi-3's
    gate_up_proj, whose halves a SwiGLU couples position by position), a mask goes on every
    reader's input instead, if each carries the group whole (``act(gate) * up`` before down)."""
    points = []
    for r in group.readers:
        src = r.node.args[r.arg] if r.arg is not None and r.arg < len(r.node.args) else None
        shape = src.meta.get("shape") if isinstance(src, fx.Node) else None
        if not whole(r) or not isinstance(shape, torch.Size):
            return []
        points.append(MaskPoint(src, r.dim - len(shape) if r.dim >= 0 else r.dim))
    return list(dict.fromkeys(points))


_ADD = frozenset({operator.add, operator.sub, operator.iadd, operator.isub, torch.add, torch.sub, "add", "sub",
                  "add_", "sub_", "__add__", "__radd__", torch.cat, torch.concat})


def adds_parameter(node: fx.Node) -> bool:
    """Whether `node` adds to (or subtracts from) channels a tensor of the model's, or joins one to
    them (a class token; its channel rule recorded the parameter): the result is not zero where
    the channels were."""
    return node.op in ("call_function", "call_method") and node.target in _ADD


_METADATA = frozenset({"ndim", "shape", "dtype", "device"})


def data_users(node: fx.Node) -> list[fx.Node]:
    """The users of `node` that read its values: ``x.ndim``, ``x.shape`` and ``x.dim()`` (timm's
    ``_assert(x.ndim == 4)``) do not, and a mask after `node` leaves them as they were."""
    return [u for u in node.users
            if not (u.op == "call_function" and u.target is getattr and len(u.args) > 1 and u.args[1] in _METADATA
                    or u.op == "call_method" and u.target in ("dim", "size"))]


def is_trailing(user: fx.Node, node: fx.Node) -> bool:
    """A channel-local op (BN, activation, dropout) of one input besides the model's own tensors
    (F.batch_norm's statistics) that ends a producer's chain."""
    if [a for a in user.all_input_nodes if a.op != "get_attr"] != [node]:
        return False
    if user.op == "call_function":
        return user.target in _TRAILING_FUNCTIONS
    if user.op == "call_method":
        return user.target in ("relu", "sigmoid", "tanh", "relu_", "sigmoid_")
    if user.op != "call_module":
        return False
    m = submodule(user.graph.owning_module, str(user.target))
    return isinstance(m, _TRAILING) and not isinstance(m, UnitMask)


_TRAILING = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU,
             nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish,
             nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
_TRAILING_FUNCTIONS = {torch.relu, torch.sigmoid, torch.tanh, F.relu, F.relu6, F.gelu, F.silu, F.hardswish,
                       F.hardsigmoid, F.sigmoid, F.leaky_relu, F.elu, F.dropout, F.batch_norm}


def _downstream(node: fx.Node, sources: set[fx.Node]) -> bool:
    """Whether `node` reads one of `sources` through reshapes alone (BEiT-3's norm reads the
    attention output transposed and reshaped): not through another layer, which another block's
    projection reads a head point of an earlier block through (T5's heads, one group across blocks)."""
    frontier = [node]
    while frontier:
        for a in frontier.pop().all_input_nodes:
            if a in sources:
                return True
            if is_reshape(a):
                frontier.append(a)
    return False
