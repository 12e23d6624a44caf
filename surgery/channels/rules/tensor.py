"""Channel rules for tensor functions and methods: element-wise ops, cat/split/getitem,
reshapes and permutes, size reads. See :mod:`surgery.channels.rules`.
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ...calling import typed_dict
from ..rulebook import NO_CHANNELS, RuleContext, passthrough, register_rule, varying
from .common import _nan_like, _owner, _vals, reshape_rule
from .operands import untracked_operand


# ----------------------------------------------------------------------------------------- functions
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
    out = ctx.couple(ia, ib) if ia is not None and ib is not None else (ia if ia is not None else ib)
    return out, _binary_values(ctx, a, b, ia, ib, out, name)


def _joined_values(out: np.ndarray, lays: list, vals: list) -> np.ndarray | None:
    """The values of tensors joined along an axis no channel varies along (a class token's cat
    with the patch tokens): a channel holds a known value where every part holds that value
    (CrossViT joins a branch's tokens with the other branch's projected class token, both zero
    where masked); None where an untracked part joins (its values along the channels are not
    followed)."""
    if any(x is None for x in lays) or any(v is None for v in vals):
        return None
    try:
        parts = [np.broadcast_to(v, out.shape) for v in vals]
    except ValueError:
        return None
    joined = parts[0].copy()
    for v in parts[1:]:
        joined = np.where(joined == v, joined, np.nan)
    return joined


def where_rule(ctx: RuleContext):
    """``torch.where(cond, x, y)`` and ``x.masked_fill(mask, value)``: element-wise, like
    :func:`binary_rule` over three operands."""
    n = ctx.node  # the order does not matter here (torch.where(c, x, y) or x.where(c, y))
    args = list(n.args[:3]) + [n.kwargs[k] for k in ("condition", "input", "self", "other", "mask", "value")
                               if k in n.kwargs]
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
    return out, None


def addcmul_rule(ctx: RuleContext):
    """``torch.addcmul(input, t1, t2, value=v)`` (= input + v * t1 * t2; ConvNeXt-V2's global
    response norm applies its weight and bias so): element-wise over three operands, as
    :func:`where_rule`; untracked ones (a parameter's view) are cut with the channels, and the
    values follow (a zero factor makes the product zero, so a bias alone shows where the output
    is not zero)."""
    n = ctx.node
    args = list(n.args[:3]) + [n.kwargs[k] for k in ("input", "self", "tensor1", "tensor2") if k in n.kwargs]
    out_shape = ctx.shape()
    lays = [ctx.ids(t) for t in args]
    if len(args) != 3 or all(x is None for x in lays) or out_shape is None:
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
    known = [_operand(ctx, t, x, out) for t, x in zip(args, lays)]
    if any(k is None for k in known):
        return out, None
    base, t1, t2 = known
    product = torch.where((t1 == 0) | (t2 == 0), torch.zeros((), dtype=torch.float64), t1 * t2)
    values = (base + float(ctx.arg(3, "value", 1)) * product).numpy()
    try:
        return out, np.broadcast_to(values, out.shape).copy()
    except ValueError:
        return out, None


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


def cat_rule(ctx: RuleContext):
    n = ctx.node
    tensors = list(n.args[0] if n.args else n.kwargs["tensors"])
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    stack = getattr(n.target, "__name__", "") == "stack"
    out_shape = ctx.shape()
    lays = [ctx.ids(t) for t in tensors]
    if all(x is None for x in lays) or out_shape is None:
        return None
    if stack:  # stack = unsqueeze then cat
        dim = dim % len(out_shape)
        lays = [np.expand_dims(x, dim) if x is not None else None for x in lays]
        shapes = [tuple(ctx.shape(t))[:dim] + (1,) + tuple(ctx.shape(t))[dim:] for t in tensors]
    else:
        dim = dim % len(out_shape)
        shapes = [tuple(ctx.shape(t)) for t in tensors]
    vals = [_vals(ctx, t, x) for t, x in zip(tensors, lays)]
    if stack:
        vals = [np.expand_dims(v, dim) if v is not None and ctx.values(t) is not None else v
                for t, v in zip(tensors, vals)]
    along = any(x is not None and x.shape[dim] > 1 for x in lays)
    if not along:
        tracked = [x for x in lays if x is not None]
        out = tracked[0]
        for x in tracked[1:]:
            out = ctx.couple(out, x)
        for t, x in zip(tensors, lays):  # a class token: a parameter of the model, cut alike
            if x is None:
                untracked_operand(ctx, t, out.reshape((1,) * (len(out_shape) - out.ndim) + out.shape), len(out_shape))
        return out, _joined_values(out, lays, vals)
    parts, vparts = [], []
    other = [max((x.shape[d] for x in lays if x is not None), default=1) if d != dim else None
             for d in range(len(out_shape))]
    for t, x, s, v in zip(tensors, lays, shapes, vals):
        target = tuple(s[dim] if d == dim else other[d] for d in range(len(out_shape)))
        if x is None:
            start = ctx.g.new_elements(s[dim], n)
            shp = [1] * len(out_shape)
            shp[dim] = s[dim]
            x = np.arange(start, start + s[dim]).reshape(shp)
            ctx.freeze(x, f"{ctx.describe()} stacks them with {getattr(t, 'name', t)!r}, whose channels "
                          "are not tracked")
            v = _nan_like(x)
        parts.append(np.broadcast_to(x, target))
        vparts.append(np.broadcast_to(v, target) if v is not None else np.full(target, np.nan))
    ctx.g.rewrite.add(n)
    return np.concatenate(parts, axis=dim), np.concatenate(vparts, axis=dim)


def getitem_rule(ctx: RuleContext):
    n = ctx.node
    src, idx = n.args[0], n.args[1]
    lay = ctx.ids(src)
    if isinstance(lay, tuple):
        if lay[idx] is None:  # an item without channels (beside items with: a list handed over)
            return NO_CHANNELS
        v = ctx.values(src)
        return lay[idx], (v[idx] if isinstance(v, tuple) else None)
    if lay is None or not isinstance(src, fx.Node) or ctx.shape(src) is None:
        return None
    items = list(idx) if isinstance(idx, tuple) else [idx]
    nd = lay.ndim
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        if i is Ellipsis:
            expanded += [slice(None)] * (nd - used)
        else:
            expanded.append(i)
    d = 0
    np_idx: list[Any] = []
    touched = False
    for i in expanded:
        if i is None:
            np_idx.append(None)
            continue
        if d >= nd:
            break
        if isinstance(i, slice) and all(isinstance(s, (int, type(None))) for s in (i.start, i.stop, i.step)):
            np_idx.append(i if lay.shape[d] > 1 else slice(None))
            touched |= lay.shape[d] > 1 and i != slice(None)
        elif isinstance(i, slice) and lay.shape[d] > 1 and (fixed := _run_time_slice(ctx, i, d, len(np_idx))):
            # x[..., :x.shape[-1] // 2] (rotate_half): bounds computed at run time follow the axis'
            # length, which must then stay whole
            np_idx.append(fixed)
            ctx.fix_axis(lay, d, f"{ctx.describe()} slices axis {d} at a position computed at run time")
        elif isinstance(i, int):
            np_idx.append(i if lay.shape[d] > 1 else 0)
            touched |= lay.shape[d] > 1
        else:
            if lay.shape[d] > 1:
                ctx.freeze(lay, f"{ctx.describe()} indexes the channels with {type(i).__name__}")
                return None
            np_idx.append(slice(None))  # advanced index on an axis channels do not vary along
            if not isinstance(i, slice):
                return None
        d += 1
    if touched:
        if any(isinstance(i, slice) and i.step not in (None, 1) for i in np_idx if i is not None):
            ctx.freeze(lay, f"{ctx.describe()} slices the channels with a step")
        ctx.g.rewrite.add(n)
    out = lay[tuple(np_idx)]
    v = ctx.values(src)
    return out, (v[tuple(np_idx)] if v is not None else None)


def _run_time_slice(ctx: RuleContext, i: slice, d: int, out_axis: int) -> slice | None:
    """The concrete slice of a slice with one bound computed at run time (a node), from the
    input and output lengths; None when it cannot be told."""
    if i.step not in (None, 1) or isinstance(i.start, fx.Node) and isinstance(i.stop, fx.Node):
        return None
    size, out = ctx.shape(ctx.node.args[0]), ctx.shape()
    if size is None or out is None or out_axis >= len(out):
        return None
    n, m = size[d], out[out_axis]
    if isinstance(i.stop, fx.Node) and i.start in (None, 0):
        return slice(0, m)
    if isinstance(i.start, fx.Node) and i.stop is None:
        return slice(n - m, n)
    return None


def split_rule(ctx: RuleContext):
    n = ctx.node
    x = ctx.x
    lay = ctx.ids(x)
    shapes = n.meta.get("shape")
    if lay is None or not isinstance(shapes, tuple):
        return None
    name = getattr(n.target, "__name__", str(n.target))
    if name == "unbind":
        dim = ctx.arg(1, "dim", 0) % lay.ndim
        if lay.shape[dim] > 1:
            ctx.g.rewrite.add(n)
        return tuple(np.take(lay, i if lay.shape[dim] > 1 else 0, axis=dim) for i in range(len(shapes))), None
    dim = ctx.arg(2 if name in ("split", "tensor_split") else 2, "dim", 0) % lay.ndim
    v = ctx.values(x)
    if lay.shape[dim] == 1:
        return tuple(lay for _ in shapes), (tuple(v for _ in shapes) if v is not None else None)
    sizes = [s[dim] for s in shapes]
    cuts = np.cumsum(sizes)[:-1]
    ctx.g.rewrite.add(n)
    parts = tuple(np.split(lay, cuts, axis=dim))
    return parts, (tuple(np.split(v, cuts, axis=dim)) if v is not None else None)


def permute_rule(ctx: RuleContext):
    n = ctx.node
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    nd = lay.ndim
    name = getattr(n.target, "__name__", str(n.target))
    rest = list(n.args[1:])
    if name == "permute":
        dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if not dims:
            dims = list(n.kwargs.get("dims", []))
        perm = [d % nd for d in dims]
    elif name in ("transpose", "swapaxes", "swapdims"):
        d0, d1 = (rest + [n.kwargs.get("dim0"), n.kwargs.get("dim1")])[:2]
        perm = list(range(nd))
        perm[d0 % nd], perm[d1 % nd] = perm[d1 % nd], perm[d0 % nd]
    elif name in ("t",):
        perm = list(range(nd))[::-1]
    elif name == "movedim":
        src, dst = rest[0], rest[1]
        order = list(range(nd))
        order.remove(src % nd)
        order.insert(dst % nd, src % nd)
        perm = order
    else:
        return None
    v = ctx.values(ctx.x)
    return np.transpose(lay, perm), (np.transpose(v, perm) if v is not None else None)


def size_rule(ctx: RuleContext):
    """x.size() / x.shape / x.numel(): remember who reads a channel count (see size_uses_ok)."""
    n = ctx.node
    x = ctx.x
    lay = ctx.ids(x)
    if n.op == "call_function" and n.target is getattr and n.args[1] != "shape":
        return None
    if lay is None or not varying(lay):
        return None
    ctx.g.size_nodes.append((n, x))
    return None


_BINARY = [operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
           operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
           "add", "sub", "mul", "div", "add_", "mul_", "sub_", "__add__", "__mul__", "__radd__", "__rmul__"]
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


def expand_rule(ctx: RuleContext):
    lay = ctx.ids(ctx.x)
    if lay is None:
        return None
    if varying(lay):
        ctx.g.rewrite.add(ctx.node)
    nd = len(ctx.shape())
    v = ctx.values(ctx.x)  # copies of the same values: zeros stay zeros (repeat_kv's expand)
    lift = (1,) * (nd - lay.ndim)
    carried = v.reshape(lift + v.shape) if v is not None and v.shape == lay.shape else None
    return lay.reshape(lift + lay.shape), carried


register_rule("expand", expand_rule)
for _t in [torch.where, "where", torch.masked_fill, "masked_fill"]:
    register_rule(_t, where_rule)
for _t in [torch.cat, torch.concat, torch.stack]:
    register_rule(_t, cat_rule)
register_rule(operator.getitem, getitem_rule)
for _t in [torch.split, torch.chunk, torch.unbind, "split", "chunk", "unbind"]:
    register_rule(_t, split_rule)
for _t in [torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, "flatten", "view", "reshape",
           "squeeze", "unsqueeze"]:
    register_rule(_t, reshape_rule)
for _t in [torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.t,
           "permute", "transpose", "swapaxes", "t", "movedim"]:
    register_rule(_t, permute_rule)
for _t in ["size", getattr, "numel"]:
    register_rule(_t, size_rule)


def typed_dict_rule(ctx: RuleContext):
    """A ModelOutput (or OrderedDict) built in the graph (:func:`surgery.calling.typed_dict`): its
    fields keep their shapes, so the channels in them stay, each named by its field."""
    name, fields = ctx.node.args[0], ctx.node.args[1]
    to_output = any(u.op == "output" for u in ctx.node.users)
    for key, value in fields.items():
        nodes: list[fx.Node] = []
        fx.node.map_arg(value, nodes.append)
        for n in nodes:
            lay = ctx.ids(n)
            for part in (lay if isinstance(lay, tuple) else (lay,)):
                ctx.freeze(part, f"reaches the model output as {key!r}" if to_output else
                           f"is packed into {name.rpartition(':')[2]} as {key!r}, which the rules do not follow")
    return None


register_rule(typed_dict, typed_dict_rule)
