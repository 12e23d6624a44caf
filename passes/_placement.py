"""Where per-unit masks go: one shared decision per set of coupled units.

All three mask passes place their modules through this module. A *site* is one decision: the
number of units and the (node, dim) points after which the same module is called. Per-unit
masks (DAM, GumbelMask) get one site per channel group (:mod:`surgery.channels`), so coupled
layers share a mask; per-tensor modules (the Sparsifier) get one site per selected op, after
its channel-local tail (BatchNorm, activation): that is where its values leave the op.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgery import channels
from surgery.errors import SurgeryError
from surgery.graph import submodule, unique_name
from surgery.pipeline import UnitMask
from surgery.select import Selector, select_nodes

__all__ = ["Site", "unit_sites", "tensor_sites", "insert_site", "tail"]

# ops that keep each channel in place and map 0 -> 0 (so a mask may move past them)
_LOCAL_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU,
                  nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU, nn.Mish, nn.Tanh, nn.Identity)
_LOCAL_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.hardswish, F.elu,
                    torch.tanh, F.mish}
_LOCAL_METHODS = {"relu", "tanh"}


@dataclass
class Site:
    """One mask decision: `units` units, shared by every (node, dim) in `points`."""

    name: str
    units: int
    points: list[tuple[fx.Node, int]]
    sources: list[fx.Node] = field(default_factory=list)  # the selected nodes it covers

    @property
    def dim(self) -> int:
        """The unit axis valid at every point: counted from the front when all points agree
        that way, else from the end (one mask module has one `dim`)."""
        if len({d for _, d in self.points}) == 1:
            return self.points[0][1]
        front, back = set(), set()
        for node, d in self.points:
            shape = node.meta.get("shape")
            rank = len(shape) if isinstance(shape, torch.Size) else None
            if rank is None:
                return d
            front.add(d % rank)
            back.add(d % rank - rank)
        if len(front) == 1:
            return front.pop()
        if len(back) == 1:
            return back.pop()
        raise SurgeryError(f"{self.name}: its points put the units on different axes "
                           f"({[(n.name, d) for n, d in self.points]}); one mask cannot serve them")


def _is_local(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(submodule(gm, str(n.target)), _LOCAL_MODULES)
    if n.op == "call_function":
        return n.target in _LOCAL_FUNCTIONS
    if n.op == "call_method":
        return n.target in _LOCAL_METHODS
    return False


def tail(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """The last node of `node`'s chain of channel-local ops (BatchNorm, activations) that
    only it feeds; a mask placed there zeroes what leaves the op."""
    cur = node
    while len(cur.users) == 1:
        (nxt,) = cur.users
        if not _is_local(gm, nxt) or nxt.args[:1] != (cur,):
            break
        cur = nxt
    return cur


def unit_sites(gm: fx.GraphModule, select: Selector, exclude: Selector, owner: str
               ) -> tuple[list[Site], dict[str, str]]:
    """The mask sites for the selected ops, and the selected ops left unmasked (name -> why).

    One site per channel group that a selected op produces, placed at the group's mask points
    (every producer of the group, after its BN/activation), so a selected op masks its whole
    group. Frozen groups (the model output, ops the channel rules cannot follow) and groups
    whose producers do not carry all their channels get no mask.
    """
    nodes = select_nodes(gm, select, exclude, skip=(UnitMask,))
    groups = channels.channel_groups(gm)
    sites: list[Site] = []
    skipped: dict[str, str] = {}
    seen: dict[int, Site] = {}
    for node in nodes:
        produced = [g for g in channels.group_of(groups, node) if any(p.node is node for p in g.producers)]
        if not produced:
            skipped[str(node.target)] = "it produces no channel group"
            continue
        for group in produced:
            if id(group) in seen:
                seen[id(group)].sources.append(node)
                continue
            if group.frozen:
                skipped[str(node.target)] = f"its channel group is frozen: {group.frozen}"
                continue
            points = list(group.mask_points())
            if not points:
                skipped[str(node.target)] = "its channel group has no place for one shared mask"
                continue
            site = Site(f"{owner}_{str(node.target)}", group.size, points, [node])
            seen[id(group)] = site
            sites.append(site)
    if not sites:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise SurgeryError(f"{owner}: no mask could be placed for the selected ops ({why})")
    return sites, skipped


def tensor_sites(gm: fx.GraphModule, select: Selector, exclude: Selector, owner: str,
                 skip: tuple[type, ...] = ()) -> list[Site]:
    """One site per selected op (after its channel-local tail), for per-tensor modules that
    need no channel coupling (the activation sparsifier; `units` is 0: not per unit)."""
    nodes = select_nodes(gm, select, exclude, skip=(UnitMask, *skip))
    return [Site(f"{owner}_{str(n.target)}", 0, [(tail(gm, n), -1)], [n]) for n in nodes]


def insert_site(gm: fx.GraphModule, site: Site, module: nn.Module) -> list[fx.Node]:
    """Install `module` once and call it after every point of `site` (a shared decision)."""
    target = unique_name(gm, site.name)
    gm.add_submodule(target, module)
    new_nodes = []
    for node, _ in site.points:
        if node.op == "output":
            raise SurgeryError(f"{site.name}: cannot place a mask after the graph output")
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(target, (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        new.meta.update({k: v for k, v in node.meta.items() if k in ("shape", "dtype")})
        new_nodes.append(new)
    gm.graph.lint()
    gm.recompile()
    return new_nodes
