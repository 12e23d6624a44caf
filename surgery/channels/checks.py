"""Checks after the walk that freeze what the rules cannot vouch for: a channel count read as a
number, and a sliced tensor with a use no rule followed (a tied holder, a get_attr read).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch.fx as fx

from ..copying import held_tensor, tied_tensors
from ..graph import submodule
from .rules.common import _param_source
from .rules.tensor import size_uses_ok

if TYPE_CHECKING:
    from .groups import ChannelGraph

__all__ = ["check_sizes", "check_tensor_uses"]


def check_sizes(cg: ChannelGraph) -> None:
    """A channel count read with size()/shape may only steer reshapes (rewritten by Shrink);
    anything else (a scale computed from it) would change when channels go."""
    for size_node, tensor in cg.size_nodes:
        bad = size_uses_ok(cg, size_node)
        if bad is not None:
            ids = cg.layouts.get(tensor)
            cg.frozen.append((np.unique(ids), f"node {bad.name!r} uses the channel count of "
                                f"{tensor.name!r} (read by {size_node.name!r}) as a number"))


def check_tensor_uses(cg: ChannelGraph) -> None:
    """A tensor can lose channels on an axis only if the rules saw every use of that axis. Two
    kinds of use can escape them: another module holding the same tensor (tied weights, whose
    places are otherwise coupled into one decision by :func:`surgery.copying.tensor_key`), and a
    ``get_attr`` read whose reader no rule recorded (``self.conv.weight.norm()``). Either would see
    a tensor resized behind its back, so the axis stays whole, with the use named."""
    gm = cg.gm
    tied = tied_tensors(gm)
    reads: dict[int, list] = {}  # tensor id -> get_attr nodes that read it
    for g in gm.graph.find_nodes(op="get_attr"):
        prefix, _, name = str(g.target).rpartition(".")
        t = held_tensor(submodule(gm, prefix), name)
        if t is not None:
            reads.setdefault(id(t), []).append(g)
    if not tied and not reads:
        return
    seen: dict[tuple[int, int], tuple[set, set, list]] = {}
    for p in cg.places:
        for owner, name, dim in p.params:
            t = held_tensor(owner, name)
            if t is not None and (id(t) in tied or id(t) in reads):
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
        for g in reads.get(tid, ()) if reason is None else ():
            unfollowed = [u for u in g.users if not _followed(u, g, nodes)]
            if unfollowed:
                reason = (f"node {unfollowed[0].name!r} reads {g.target!r} as a whole tensor, which the channel "
                          f"rules do not follow along axis {dim}")
                break
        if reason is not None:
            for lay in ids:
                cg.frozen.append((np.unique(lay), reason))


def _followed(use: fx.Node, read: fx.Node, nodes: set) -> bool:
    """Whether a rule saw `use` of the get_attr `read`: a place at it, or at every use of a tensor
    computed from `read` element by element (Gemma's ``1.0 + weight.float()``)."""
    if use in nodes:
        return True
    return _param_source(use) is read and bool(use.users) and all(_followed(u, read, nodes) for u in use.users)
