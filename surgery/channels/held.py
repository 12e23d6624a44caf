"""The check after the walk that a tensor losing channels has no use the rules did not follow:
a tied holder, a ``get_attr`` read, another call of the module that holds it (see
:func:`check_tensor_uses`).
"""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx

from ..copying import held_tensor, tied_tensors
from ..graph import submodule
from .rules.operands import _param_source, _param_tree

if TYPE_CHECKING:
    from .groups import ChannelGraph

__all__ = ["check_tensor_uses"]


def check_tensor_uses(cg: ChannelGraph) -> None:
    """A tensor can lose channels on an axis only if the rules saw every use of that axis. Three
    kinds of use can escape them: another module holding the same tensor (tied weights, whose
    places are otherwise coupled into one decision by :func:`surgery.copying.tensor_key`), a
    ``get_attr`` read whose reader no rule recorded (``self.conv.weight.norm()``), and another
    call of the same module on an input whose channels the rules do not track (DeBERTa's
    ``query_proj`` applied to the relative-position table as well as to the hidden states).
    Each would see a tensor resized behind its back, so the axis stays whole, with the use named."""
    tied: dict = {}
    reads: dict[int, list] = {}  # tensor id -> get_attr nodes that read it
    calls: dict[int, list] = {}  # tensor id -> the calls of a module called more than once that holds it
    for gm, _ in cg.parts:
        tied.update(tied_tensors(gm))
        for g in gm.graph.find_nodes(op="get_attr"):
            prefix, _, name = str(g.target).rpartition(".")
            t = held_tensor(submodule(gm, prefix), name)
            if t is not None:
                reads.setdefault(id(t), []).append(g)
        by_module: dict[str, list] = {}
        for n in gm.graph.find_nodes(op="call_module"):
            by_module.setdefault(str(n.target), []).append(n)
        for target, nodes in by_module.items():
            if len(nodes) > 1:
                m = submodule(gm, target)
                for t in (*m._parameters.values(), *m._buffers.values()):
                    if t is not None:
                        calls.setdefault(id(t), []).extend(nodes)
    if not tied and not reads and not calls:
        return
    seen: dict[tuple[int, int], tuple[set, set, list]] = {}
    for p in cg.places:
        for owner, name, dim in p.params:
            t = held_tensor(owner, name)
            if t is not None and (id(t) in tied or id(t) in reads or id(t) in calls):
                holders, nodes, ids = seen.setdefault((id(t), dim), (set(), set(), []))
                holders.add((id(owner), name))
                nodes.add(p.node)
                ids.append(p.ids)
    for (tid, dim), (holders, nodes, ids) in seen.items():
        reason = None
        missing = [q for q, owner, name in tied.get(tid, ()) if (id(owner), name) not in holders]
        if missing:
            names = [q for q, *_ in tied[tid]]
            reason = (f"{names[0]} is tied to {', '.join(names[1:])} (one tensor), and the use of {missing[0]} "
                      f"along axis {dim} is not followed by the channel rules")
        unseen = [c for c in calls.get(tid, ()) if c not in nodes]
        if unseen and reason is None:
            reason = (f"{unseen[0].target!r} is also called at node {unseen[0].name!r}, on an input whose channels "
                      f"the rules do not track along axis {dim}")
        for g in reads.get(tid, ()) if reason is None else ():
            if g in nodes:  # a read the rules track as channels (an Embedding's table): its uses are followed
                continue
            unfollowed = [u for u in g.users if not _followed(u, g, nodes, dim) and not _reads_other_axes(u, g, dim)]
            if unfollowed:
                reason = (f"node {unfollowed[0].name!r} reads {g.target!r} as a whole tensor, which the channel "
                          f"rules do not follow along axis {dim}")
                break
        if reason is not None:
            for lay in ids:
                cg.frozen.append((np.unique(lay), reason))


_METADATA = frozenset({"dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"})


def _reads_other_axes(use: fx.Node, read: fx.Node, dim: int) -> bool:
    """Whether `use` only reads `read`'s metadata, or sizes of axes other than `dim` (Dinov2's
    ``self.position_embeddings.shape[1] - 1``, which counts positions, not channels; NaFlexViT's
    ``pos_embed.shape[1:3]``, its grid)."""
    shape = read.meta.get("shape")
    if not isinstance(shape, torch.Size):
        return False

    def other(k: Any) -> bool:
        if isinstance(k, slice) and all(isinstance(b, (int, type(None))) for b in (k.start, k.stop, k.step)):
            return dim % len(shape) not in range(len(shape))[k]
        return isinstance(k, int) and -len(shape) <= k < len(shape) and k % len(shape) != dim

    if use.op == "call_function" and use.target is getattr and len(use.args) == 2:
        if use.args[1] in _METADATA:
            return True
        return use.args[1] == "shape" and bool(use.users) and all(
            u.op == "call_function" and u.target is operator.getitem and other(u.args[1]) for u in use.users)
    if use.op == "call_method" and use.target in ("dim", "ndimension"):
        return True
    if use.op == "call_method" and use.target in ("to", "type_as") and use.args[0] is not read:
        return True  # another tensor cast to its dtype and device (Gemma-4's ``one_hot.to(table)``)
    return use.op == "call_method" and use.target == "size" and len(use.args) == 2 and other(use.args[1])


def _followed(use: fx.Node, read: fx.Node, nodes: set, dim: int) -> bool:
    """Whether a rule saw `use` of the get_attr `read`: a place at it, or at every use of a tensor
    computed from `read` element by element (Gemma's ``1.0 + weight.float()``, a frozen
    BatchNorm's ``weight * (running_var + eps).rsqrt()``) but those that read only sizes of axes
    other than `dim` (PiT's ``cls_token.expand(B, -1, -1).shape[1]``, a count of tokens)."""
    if use in nodes:
        return True
    if use.op == "call_function" and use.target in (torch.cat, torch.concat) and use.users and \
            all(u in nodes for u in use.users):
        return True  # parts of one bias, each cut where the layer that adds it is (BEiT's q/k/v biases)
    if _param_source(use) is not read and not any(s is read for s, _ in _param_tree(use) or ()):
        return False
    rank = read.meta.get("shape"), use.meta.get("shape")
    same_axes = all(isinstance(r, torch.Size) for r in rank) and len(rank[0]) == len(rank[1])
    return bool(use.users) and all(_followed(u, read, nodes, dim) or same_axes and _reads_other_axes(u, use, dim)
                                   for u in use.users)
