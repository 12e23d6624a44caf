"""Where per-unit masks go: one shared decision per set of coupled units.

All three mask passes place their modules through :func:`unit_sites` and :func:`insert_site`,
so switching from per-node placement to channel-group placement happens here only.

A *site* is one mask decision: the number of units, and the (node, dim) points after which the
same mask module is called. Per-node placement (used when ``surgery.channels`` is absent or a
node is in no group) puts the point after the selected op's channel-local tail (BatchNorm,
activation), because that is where its channels leave it: a zero there stays zero downstream.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgery.errors import SurgeryError
from surgery.graph import unique_name
from surgery.pipeline import UnitMask
from surgery.select import Selector, select_nodes

__all__ = ["Site", "unit_sites", "tensor_sites", "insert_site", "unit_dim", "tail"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
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
        return isinstance(gm.get_submodule(str(n.target)), _LOCAL_MODULES)
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


def unit_dim(gm: fx.GraphModule, node: fx.Node) -> tuple[int, int]:
    """(units, dim) of `node`'s output: dim 1 for conv feature maps, the last dim for Linear
    outputs and any tensor of rank < 3."""
    shape = node.meta.get("shape")
    if not isinstance(shape, torch.Size):
        raise SurgeryError(f"node {node.name!r} ({node.target}) has no known tensor shape; "
                           "pass example_inputs to compress()")
    module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    dim = 1 if isinstance(module, _CONV) and len(shape) >= 3 else -1
    if module is None and len(shape) >= 3:
        dim = 1
    return int(shape[dim]), dim


def _groups(gm: fx.GraphModule):
    try:
        from surgery import channels
    except ImportError:  # channel groups not available: one mask per selected op
        return None
    return channels


def unit_sites(gm: fx.GraphModule, select: Selector, exclude: Selector, owner: str
               ) -> tuple[list[Site], dict[str, str]]:
    """The mask sites for the selected ops, and the selected ops left unmasked (name -> why).

    With ``surgery.channels``: one site per channel group that a selected op produces, placed
    at the group's mask points (every producer of the group, after its BN/activation), so a
    selected op masks its whole group. Frozen groups (and groups whose producers do not carry
    all their channels) get no mask. Without it: one site per selected op.
    """
    nodes = select_nodes(gm, select, exclude, skip=(UnitMask,))
    channels = _groups(gm)
    if channels is None:
        return [_node_site(gm, n, owner) for n in nodes], {}
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
    return sites, skipped


def _units_at(point: tuple[fx.Node, int]) -> int:
    node, dim = point
    shape = node.meta.get("shape")
    if not isinstance(shape, torch.Size):
        raise SurgeryError(f"node {node.name!r} has no known tensor shape; pass example_inputs to compress()")
    return int(shape[dim])


def _node_site(gm: fx.GraphModule, node: fx.Node, owner: str) -> Site:
    units, dim = unit_dim(gm, node)
    return Site(f"{owner}_{str(node.target)}", units, [(tail(gm, node), dim)], [node])


def tensor_sites(gm: fx.GraphModule, select: Selector, exclude: Selector, owner: str) -> list[Site]:
    """One site per selected op (after its channel-local tail), for per-tensor modules that
    need no channel coupling (the activation sparsifier)."""
    return [_node_site(gm, n, owner) for n in select_nodes(gm, select, exclude, skip=(UnitMask,))]


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
