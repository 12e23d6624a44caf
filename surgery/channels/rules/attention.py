"""Channel rules for attention: a matmul over a head axis, and ``scaled_dot_product_attention``.
See :mod:`surgery.channels.rules`.

Attention splits a projection's output into heads, ``(B, T, H*d) -> (B, H, T, d)``, and then
multiplies per head: the head axis is batch-like. Within a head, ``q @ k^T`` contracts the head
dimension and ``attn @ v`` mixes tokens, so removing one position of a head is never exact on its
own; removing a *whole* head is, when the same head goes from q, k, v and from the output
projection's input. The rules here therefore make every head one channel: all elements of head h
in q, k and v are coupled (q's head h with k's and v's, or with the kv head that serves it under
grouped-query attention), and the output carries that channel per head. A kv head that serves
several query heads is one channel with all of them.

A head is exactly removable where the output projection reads zero in it, which holds when the
head's output is zero: that is where a mask goes (a *point*: the output of ``attn @ v`` or of
``scaled_dot_product_attention`` on its head axis, or ``v`` before it is repeated for its query
heads). Nothing about a head's size changes, so the softmax scale stays as it was.

With ``gm.meta["surgery"]["attention_units"] == "head_dims"`` (``ChannelPrune(attention=
"head_dims")``) the unit is a position of every head instead: see :mod:`.head_dims`.

Example::

    >>> import torch, surgery
    >>> from torch import nn
    >>> from surgery.channels import channel_groups
    >>> class Attn(nn.Module):
    ...     def __init__(self, d=16, h=4):
    ...         super().__init__()
    ...         self.h, self.qkv, self.out = h, nn.Linear(d, 3 * d), nn.Linear(d, d)
    ...     def forward(self, x):
    ...         B, T, D = x.shape
    ...         q, k, v = self.qkv(x).view(B, T, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
    ...         y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    ...         return self.out(y.transpose(1, 2).reshape(B, T, D))
    >>> gm = surgery.capture(Attn(), (torch.randn(2, 5, 16),))
    >>> [g.size for g in channel_groups(gm) if not g.frozen]  # the 4 heads
    [4]
"""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..rulebook import RuleContext, register_rule, varying
from .common import _owner
from .head_dims import _across_heads, _either_zero, _lift, _one_head_values, _sdpa_dims, head_dims
from .operands import untracked_operand

_CARRIERS = {"view", "reshape", "expand", "getitem", "contiguous", "repeat_interleave", "unsqueeze", "clone"}


def _heads(ctx: RuleContext, x: np.ndarray) -> np.ndarray:
    """Couple every element of each head (an index along the batch axes) of `x` into one channel;
    return one element per head, shape (batch axes..., 1, 1)."""
    rep = x[..., :1, :1]
    ctx.couple(x, rep)
    return rep


def _zero_heads(ctx: RuleContext, arg: Any, ids: np.ndarray, nd: int) -> np.ndarray | None:
    """Per head (batch axes..., 1, 1): True where the argument is known to be zero throughout."""
    v = ctx.values(arg)
    if v is None or v.shape != ids.shape:
        return None
    return _lift((v == 0).all(axis=(-2, -1), keepdims=True), nd)


def has_heads(ids: np.ndarray | None, nd: int) -> bool:
    """Whether a matmul operand's channels vary along a batch axis (a head axis)."""
    return ids is not None and any(d < nd - 2 for d in varying(_lift(ids, nd)))


def head_matmul(ctx: RuleContext) -> tuple[np.ndarray, np.ndarray | None] | None:
    """``a @ b`` where channels vary along a batch axis: every head is one channel (see the module
    docstring); the output carries it per head. A head of the output is zero where a's rows or b's
    columns of that head are all zero."""
    n = ctx.node
    a, b = n.args[0], n.args[1]
    nd = len(ctx.shape())
    ia, ib = _lift(ctx.ids(a), nd), _lift(ctx.ids(b), nd)
    reps = [_heads(ctx, x) for x in (ia, ib) if x is not None]
    out = reps[0] if len(reps) == 1 else ctx.couple(reps[0], reps[1])
    if not _untracked_heads(ctx, [t for t, x in ((a, ia), (b, ib)) if x is None], out):
        return None
    zero = None
    for arg, ids in ((a, ia), (b, ib)):
        z = _zero_heads(ctx, arg, ctx.ids(arg), nd) if ids is not None else None
        if z is not None:
            zero = z if zero is None else zero | z
    values = np.broadcast_to(np.where(zero, 0.0, np.nan), out.shape).copy() if zero is not None else None
    # the output is where one mask realises the heads, unless a softmax normalises it: attn @ v
    # (zero output head -> the output projection reads zero), not q @ k^T (a zero score is no zero head)
    if not feeds_softmax(n):
        _points(ctx, out, b if ib is not None else a)
    return out, values


_ON_THE_WAY = {"mul", "add", "sub", "truediv", "div", "to", "float", "contiguous", "masked_fill", "where", "dropout",
               "maybe_add_mask", "permute", "transpose", "view", "reshape", "__mul__", "__add__", "__truediv__"}


def feeds_softmax(node: fx.Node, depth: int = 8) -> bool:
    """Whether `node`'s value reaches a softmax through element-wise ops and reshapes only (the
    scores of attention: a mask there makes a uniform head, not a zero one)."""
    for _ in range(depth):
        users = [u for u in node.users if u.op in ("call_function", "call_method", "call_module")]
        if not users:
            return False
        names = [u.target if u.op == "call_method" else getattr(u.target, "__name__", "") for u in users]
        if any("softmax" in str(n) for n in names):
            return True
        nxt = [u for u, nm in zip(users, names) if nm in _ON_THE_WAY]
        if len(nxt) != 1:
            return False
        node = nxt[0]
    return False


def _untracked_heads(ctx: RuleContext, others: list, heads: np.ndarray) -> bool:
    """An operand with no tracked channels that still varies along the head axis (scores that went
    through an op with no rule, an additive mask per head) would keep every head: freeze them."""
    nd = heads.ndim
    for t in others:
        s = ctx.shape(t) if isinstance(t, fx.Node) else None
        if s is None:
            continue
        full = (1,) * (nd - len(s)) + tuple(s)
        if any(full[d] > 1 for d in varying(heads) if d < nd - 2):
            ctx.freeze(heads, f"{ctx.describe()} combines these heads with {t.name!r}, whose heads are not tracked")
            return False
    return True


def _points(ctx: RuleContext, out: np.ndarray, carried: Any) -> None:
    """Record where a mask over the heads could go: this node's output on its head axis, and the
    carried operand back through the copies that repeat it for grouped-query attention."""
    node = ctx.node
    chain = len(ctx.g.places)  # the walk keeps the first of these that holds one head per position
    _point(ctx, node, out, chain)
    seen = 0
    while isinstance(carried, fx.Node) and seen < 8:
        lay = ctx.ids(carried)
        if lay is None:
            break
        _point(ctx, carried, lay, chain)
        name = carried.target if carried.op == "call_method" else getattr(carried.target, "__name__", "")
        if carried.op not in ("call_method", "call_function") or name not in _CARRIERS:
            break
        carried, seen = carried.args[0], seen + 1


def _point(ctx: RuleContext, node: fx.Node, lay: np.ndarray, chain: int) -> None:
    shape = ctx.shape(node)
    if shape is None or lay.ndim != len(shape):
        return
    axes = [d for d in varying(lay) if d < lay.ndim - 2]
    if len(axes) != 1:
        return
    idx = [0] * lay.ndim
    idx[axes[0]] = slice(None)
    ctx.point(node, lay[tuple(idx)], axes[0], chain)


def sdpa_rule(ctx: RuleContext):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
    enable_gqa)``: heads are channels, as for :func:`head_matmul`; under ``enable_gqa`` a kv head
    goes with its ``Hq / Hkv`` query heads."""
    q, k, v = (ctx.arg(i, name) for i, name in enumerate(("query", "key", "value")))
    nd = len(ctx.shape())
    ids = [_lift(ctx.ids(t), nd) for t in (q, k, v)]
    if all(x is None for x in ids):
        return None
    if not any(has_heads(x, nd) for x in ids if x is not None):
        ctx.freeze_inputs(f"{ctx.describe()} attends over these channels with no head axis (its scale depends "
                          "on their count)")
        return None
    if head_dims(ctx):
        return _sdpa_dims(ctx, (q, k, v), ids)
    q_heads = ctx.shape(q)[-3] if ctx.shape(q) is not None and len(ctx.shape(q)) >= 3 else 1
    reps = []
    for t, x in zip((q, k, v), ids):
        if x is None:
            continue
        rep = _heads(ctx, x)
        hk = rep.shape[-3] if rep.ndim >= 3 else 1
        if t is not q and hk > 1 and q_heads % hk == 0 and hk != q_heads:
            rep = np.repeat(rep, q_heads // hk, axis=-3)  # grouped-query attention
        reps.append(rep)
    out = reps[0]
    for r in reps[1:]:
        out = ctx.couple(out, r)
    mask = ctx.arg(3, "attn_mask")
    lay = ctx.ids(mask)
    if lay is not None:  # a bias per head made by the model (T5's relative positions): part of its head
        out = ctx.couple(out, _heads(ctx, _lift(lay, nd)))
    elif isinstance(mask, fx.Node):  # a parameter per head is cut with the heads; anything else freezes
        untracked_operand(ctx, mask, out, nd)
    zero = _zero_heads(ctx, v, ctx.ids(v), nd) if ids[2] is not None else None
    if zero is not None and zero.shape[-3] != out.shape[-3] and zero.shape[-3] > 1:
        zero = np.repeat(zero, out.shape[-3] // zero.shape[-3], axis=-3)
    values = np.broadcast_to(np.where(zero, 0.0, np.nan), out.shape).copy() if zero is not None else None
    if ids[2] is not None:
        _points(ctx, out, v)
    return out, values


def matmul_rule(ctx: RuleContext):
    """``a @ b`` (matmul, bmm): a contracted channel axis couples a's and b's channels position by
    position and reads them; channels on the other matrix axis are carried; channels along a
    batch axis are heads (:func:`head_matmul`)."""
    n = ctx.node
    a, b = n.args[0], n.args[1]
    ia, ib = ctx.ids(a), ctx.ids(b)
    out_shape = ctx.shape()
    if ia is None and ib is None or out_shape is None:
        return None
    if ia is not None and ia.ndim < 2 or ib is not None and ib.ndim < 2:
        ctx.freeze_inputs(f"{ctx.describe()} multiplies vectors")
        return None
    if has_heads(ia, len(out_shape)) or has_heads(ib, len(out_shape)):
        if not head_dims(ctx):
            return head_matmul(ctx)
        nd = len(out_shape)
        ia, ib = (_across_heads(ctx, _lift(x, nd), "channels") if x is not None else None for x in (ia, ib))
        if ia is None and ib is None:
            return None
        vals = [_one_head_values(ctx, t, x, nd) for t, x in ((a, ia), (b, ib))]
    else:
        vals = [ctx.values(t) if x is not None and ctx.values(t) is not None and ctx.values(t).shape == x.shape
                else None for t, x in ((a, ia), (b, ib))]
    outs = []
    contracted = []
    for x, k, pos in ((ia, -1, 0), (ib, -2, 1)):
        if x is None:
            continue
        v = varying(x)
        kd = x.ndim + k
        if kd in v:
            if v != [kd]:
                ctx.freeze_inputs(f"{ctx.describe()} contracts channels that also vary along other axes")
                return None
            contracted.append((x, kd, pos))
        elif v:
            outs.append(x)
            carried = pos
    lines = [x.reshape(-1) for x, _, _ in contracted]
    coupled = len(lines) == 2 and len(lines[0]) == len(lines[1])
    if coupled:
        # one position of both: a zero on either side drops it from the product
        ctx.couple(lines[0], lines[1])
        (x, kd, pos), (_, _, pos2) = contracted
        va, vb = (vals[p].reshape(-1) if vals[p] is not None and vals[p].size == len(lines[0]) else None
                  for p in (pos, pos2))
        either = _either_zero(va, vb, lines[0].shape)
        contracted = [(x, kd, pos)]
        vals = [either.reshape(x.shape) if either is not None and k == pos else None for k in range(2)]
    for x, kd, pos in contracted:
        params = ()
        if not coupled:  # the other operand's matching axis carries no channels: it is cut too, or nothing is
            params = _sliced_operand(ctx, (a, b)[1 - pos], 1 - pos, x.shape[kd])
            if params is None:
                ctx.freeze(x, f"{ctx.describe()} contracts these channels with {(a, b)[1 - pos]!s}, which is "
                              "not a parameter of the model that could be cut with them")
                continue
        ctx.place("reader", x, kd, arg=pos, kind="zero", values=vals[pos], params=params)
    nd = len(out_shape)
    outs = [x.reshape((1,) * (nd - x.ndim) + x.shape) for x in outs]
    if not outs:
        return None
    out = outs[0]
    for x in outs[1:]:
        out = ctx.couple(out, x)
    values = None
    vc = vals[carried] if len(outs) == 1 else None
    if vc is not None and vc.size == out.size:
        # a column of b (a row of a) that is zero throughout gives a zero column (row) of a @ b
        values = np.where(vc == 0, 0.0, np.nan).reshape(out.shape)
    return out, values


def _sliced_operand(ctx: RuleContext, t: Any, pos: int, size: int) -> list | None:
    """The parameter slice that goes with channels contracted against `t`, operand `pos` of a
    matmul: ``[(owner, attribute, axis)]`` where `t` is read straight from the model (SwiftFormer's
    ``query @ self.w_g``), its contracted axis (the last of a, the second last of b) `size` long;
    [] where `t` has a single entry along it (broadcast); None otherwise."""
    shape = ctx.shape(t)
    if shape is None or len(shape) < 2:
        return None
    axis = len(shape) - 1 if pos == 0 else len(shape) - 2
    if shape[axis] == 1:
        return []
    if isinstance(t, fx.Node) and t.op == "get_attr" and shape[axis] == size:
        return [(*_owner(ctx.g.gm, str(t.target)), axis)]
    return None


def einsum_rule(ctx: RuleContext):
    """``torch.einsum(equation, *operands)`` over heads, as MaxViT writes attention
    (``"BGHID,BGHJD->BGHIJ"``, then ``"BGHIJ,BGHJD->BGHID"``): where channels vary along a
    letter every operand and the output share (a batch letter: heads), each head is one channel
    as in :func:`head_matmul`. A single operand whose channel letters all reach the output is
    carried. Anything else freezes the channels."""
    n = ctx.node
    eq, ops = n.args[0], list(n.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (tuple, list)):
        ops = list(ops[0])
    if not isinstance(eq, str) or "->" not in eq or "." in eq:
        ctx.freeze_inputs(f"{ctx.describe()}: an equation the rules do not read")
        return None
    ins, out_letters = eq.replace(" ", "").split("->")
    ins = ins.split(",")
    lays = [ctx.ids(t) for t in ops]
    if len(ins) != len(ops) or any(x is not None and x.ndim != len(i) for x, i in zip(lays, ins)):
        ctx.freeze_inputs(f"{ctx.describe()}: operands that do not match its equation")
        return None
    batch = [c for c in out_letters if all(c in i for i in ins)]
    vary = [{i[d] for d in varying(x)} for x, i in zip(lays, ins) if x is not None]
    shape = [1] * len(out_letters)
    if any(v & set(batch) for v in vary):  # heads: every operand's head slice is one channel
        rep = None
        for x, i in zip(lays, ins):
            if x is None:
                continue
            r = x[tuple(slice(None) if c in batch else slice(0, 1) for c in i)]
            ctx.couple(x, r)
            r = np.moveaxis(r.reshape([x.shape[i.index(c)] if c in batch else 1 for c in i]),
                            [i.index(c) for c in batch], range(len(batch)))
            r = r.reshape([r.shape[k] for k in range(len(batch))])
            rep = r if rep is None else ctx.couple(rep, r)
        untracked = [t for t, x in zip(ops, lays) if x is None]
        for t, i in zip(ops, ins):
            s = ctx.shape(t) if t in untracked else None
            if s is not None and any(s[i.index(c)] > 1 and rep.shape[k] > 1 for k, c in enumerate(batch)):
                ctx.freeze(rep, f"{ctx.describe()} combines these heads with {t.name!r}, whose heads are not tracked")
                return None
        for k, c in enumerate(batch):
            shape[out_letters.index(c)] = rep.shape[k]
        out = rep.reshape(shape)
        if not feeds_softmax(n):
            _points(ctx, out, ops[-1] if lays[-1] is not None else ops[0])
        return out, None
    tracked = [(x, i) for x, i in zip(lays, ins) if x is not None]
    if len(tracked) == 1 and vary[0] <= set(out_letters):  # carried to the output, letter by letter
        x, i = tracked[0]
        perm = [i.index(c) for c in out_letters if c in i]
        moved = np.transpose(x, perm) if perm else x
        for c in out_letters:
            shape[out_letters.index(c)] = x.shape[i.index(c)] if c in i and c in vary[0] else 1
        return np.broadcast_to(moved.reshape([x.shape[i.index(c)] if c in i else 1 for c in out_letters]),
                               shape).copy(), None
    ctx.freeze_inputs(f"{ctx.describe()} mixes these channels in a way the rules cannot follow")
    return None


register_rule(torch.einsum, einsum_rule)
for _t in [torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm"]:
    register_rule(_t, matmul_rule)
register_rule(F.scaled_dot_product_attention, sdpa_rule)
if hasattr(torch._C._nn, "scaled_dot_product_attention"):
    register_rule(torch._C._nn.scaled_dot_product_attention, sdpa_rule)
