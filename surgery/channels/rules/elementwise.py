"""Channel rules for element-wise ops: arithmetic between tensors and numbers with broadcasting
(``add``, ``mul``, ``addcmul``, ``where``, ``masked_fill``, ``pow``), activations, casts and
dropout, and the values they carry (which entries a removed channel holds: zero, a constant, or
unknown). See :mod:`surgery.channels.rules`.
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..rulebook import RuleContext, passthrough, register_rule
from .common import _fit, _nan_like, _owner
from .operands import untracked_operand


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
        untracked_operand(ctx, t, tracked, nd)
    if ia is not None and ib is not None and name in _PRODUCTS and min(ia.size, ib.size) == 1 < max(ia.size, ib.size):
        # one channel scaling many (FocalNet's gate over its context, CBAM's spatial attention):
        # each product is zero where its own channel is, so the many stay apart; the one channel
        # stays while anything reads it (Shrink keeps a tensor from losing its last channel)
        wide = ia if ia.size > 1 else ib
        out = np.broadcast_to(wide, np.broadcast_shapes(ia.shape, ib.shape)).copy()
        return out, _binary_values(ctx, a, b, ia, ib, out, name)
    out = ctx.couple(ia, ib) if ia is not None and ib is not None else (ia if ia is not None else ib)
    return out, _binary_values(ctx, a, b, ia, ib, out, name)


def where_rule(ctx: RuleContext):
    """``torch.where(cond, x, y)`` and ``x.masked_fill(mask, value)``: element-wise, like
    :func:`binary_rule` over three operands."""
    n = ctx.node  # the order does not matter here (torch.where(c, x, y) or x.where(c, y))
    args = list(n.args[:3]) + [n.kwargs[k] for k in ("condition", "input", "self", "other", "mask", "value")
                               if k in n.kwargs]
    joined = _joined(ctx, args)
    return (joined[0], None) if joined is not None else None


def _joined(ctx: RuleContext, args: list) -> tuple[np.ndarray, list] | None:
    """Operands of an element-wise op, broadcast to its output: the tracked ones coupled, each
    untracked one cut with them or freezing them (:func:`untracked_operand`). (The output's
    layout, the operands' layouts) or None where none is tracked."""
    out_shape = ctx.shape()
    lays = [ctx.ids(t) for t in args]
    if all(x is None for x in lays) or out_shape is None:
        return None
    nd = len(out_shape)
    lays = [x.reshape((1,) * (nd - x.ndim) + x.shape) if x is not None else None for x in lays]
    tracked = [x for x in lays if x is not None]
    out = tracked[0]
    for x in tracked[1:]:
        out = ctx.couple(out, x)
    for t, x in zip(args, lays):
        if x is None:
            untracked_operand(ctx, t, out, nd)
    return out, lays


def addcmul_rule(ctx: RuleContext):
    """``torch.addcmul(input, t1, t2, value=v)`` (= input + v * t1 * t2; ConvNeXt-V2's global
    response norm applies its weight and bias so): element-wise over three operands, as
    :func:`where_rule`; untracked ones (a parameter's view) are cut with the channels, and the
    values follow (a zero factor makes the product zero, so a bias alone shows where the output
    is not zero)."""
    n = ctx.node
    args = list(n.args[:3]) + [n.kwargs[k] for k in ("input", "self", "tensor1", "tensor2") if k in n.kwargs]
    joined = _joined(ctx, args) if len(args) == 3 else None
    if joined is None:
        return None
    out, lays = joined
    known = [_operand(ctx, t, x, out) for t, x in zip(args, lays)]
    if any(k is None for k in known):
        return out, None
    base, t1, t2 = known
    product = torch.where((t1 == 0) | (t2 == 0), torch.zeros((), dtype=torch.float64), t1 * t2)
    return out, _fit((base + float(ctx.arg(3, "value", 1)) * product).numpy(), out.shape)


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


_BINARY = [operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
           operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
           "add", "sub", "mul", "div", "add_", "mul_", "sub_", "__add__", "__mul__", "__radd__", "__rmul__"]
_PRODUCTS = frozenset({"mul", "imul", "mul_", "__mul__", "__rmul__"})
for _t in _BINARY:
    register_rule(_t, binary_rule)
_UNARY_APPLY = [torch.relu, F.relu, F.relu6, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu, F.silu,
                F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.selu, F.hardtanh, F.mish, F.softplus,
                torch.clamp, torch.exp, operator.neg, torch.neg, F.relu_, torch.relu_,
                "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clamp_", "exp", "neg", "hardtanh",
                torch.rsqrt, torch.sqrt, torch.abs, "rsqrt", "sqrt", "abs"]
for _t in _UNARY_APPLY:
    register_rule(_t, passthrough("apply"))
for _t in ("float", "double", "half", "bfloat16", "to", "type_as"):  # casts: a zero stays zero
    register_rule(_t, passthrough("zero"))
for _t in [F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, "contiguous", "clone", "detach",
           torch.clone, torch.detach, "expand_as"]:
    register_rule(_t, passthrough("keep"))


def pow_rule(ctx: RuleContext):
    """``x ** p`` for a number p: element-wise on x's channels; anything else freezes them."""
    base, exp = (ctx.node.args + (None, None))[:2]
    if isinstance(exp, (int, float)) and ctx.ids(base) is not None:
        return passthrough("apply")(ctx)
    ctx.freeze_inputs(f"{ctx.describe()} raises to a power that is a tensor")
    return None


for _t in (torch.addcmul, "addcmul"):
    register_rule(_t, addcmul_rule)
for _t in (torch.pow, operator.pow, "pow"):
    register_rule(_t, pow_rule)
for _t in [torch.where, "where", torch.masked_fill, "masked_fill"]:
    register_rule(_t, where_rule)
