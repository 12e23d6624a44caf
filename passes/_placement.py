"""Where per-unit masks go: one shared decision per set of coupled units.

All three mask passes place their modules through this module. A *site* is one decision: the
number of units and the (node, dim) points after which the same module is called. Per-unit
masks (DAM, GumbelMask) get one site per channel group (:mod:`surgery.channels`), so coupled
layers share a mask; per-tensor modules (the Sparsifier) get one site per selected op, after
its channel-local tail (BatchNorm, activation): that is where its values leave the op.

A model captured as an eager shell keeps its traced graphs nested under eager code
(:mod:`surgery.nested`): selection, sites and insertion cover every graph of the tree, with
modules named by their qualified path from the captured model, and each mask goes into the
GraphModule whose nodes it follows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgery import channels
from surgery.errors import SurgeryError
from surgery.graph import submodule, unique_name
from surgery.nested import nested_graphs
from surgery.channels.points import MaskPoint
from surgery.pipeline import UnitMask
from surgery.select import Selector, matches, select_nodes

__all__ = ["Site", "unit_sites", "tensor_sites", "insert_site", "call_after", "axis_kwargs", "tail", "select_tree",
           "owner_of"]

# ops that keep each channel in place and map 0 -> 0 (so a mask may move past them)
_LOCAL_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6, nn.LeakyReLU,
                  nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU, nn.Mish, nn.Tanh, nn.Identity)
_LOCAL_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.leaky_relu, F.hardswish, F.elu,
                    torch.tanh, F.mish}
_LOCAL_METHODS = {"relu", "tanh"}


@dataclass
class Site:
    """One mask decision: `units` units, shared by every call in `points` (see
    :class:`surgery.channels.points.MaskPoint`)."""

    name: str
    units: int
    points: list[MaskPoint]
    sources: list[fx.Node] = field(default_factory=list)  # the selected nodes it covers

    @property
    def dim(self) -> int:
        """The unit axis valid at every point: counted from the front when all points agree
        that way, else from the end; where they agree neither way, the first point's (the
        others name theirs in the call: see :func:`insert_site`)."""
        if len({p.dim for p in self.points}) == 1:
            return self.points[0].dim
        front, back = set(), set()
        for p in self.points:
            shape, d = p.node.meta.get("shape"), p.dim
            rank = len(shape) if isinstance(shape, torch.Size) else None
            if rank is None:
                return d
            front.add(d % rank)
            back.add(d % rank - rank)
        if len(front) == 1:
            return front.pop()
        if len(back) == 1:
            return back.pop()
        return self.points[0].dim


def select_tree(gm: fx.GraphModule, select: Selector, exclude: Selector, skip: tuple[type, ...] = ()
                ) -> dict[fx.Node, str]:
    """The selected ``call_module`` nodes of `gm`'s graph and of the graphs nested under eager
    code in it, each with its module's qualified name from `gm` (what select/exclude match), in
    graph order. Raises SelectionError, as :func:`surgery.select.select_nodes` does, when none is."""
    subs = nested_graphs(gm)
    if not subs:  # one graph: names are its node targets
        return {n: str(n.target) for n in select_nodes(gm, select, exclude, skip=skip)}
    picked = {n: str(n.target) for n in select_nodes(gm, select, exclude, required=False, skip=skip)}
    for path, sub in subs.items():
        for n in sub.graph.find_nodes(op="call_module"):
            m = submodule(sub, str(n.target))
            name = f"{path}.{n.target}"
            if not (skip and isinstance(m, skip)) and matches(name, m, select, exclude):
                picked[n] = name
    if not picked:
        select_nodes(gm, select, exclude, skip=skip)  # raises, naming what matched outside every graph
    return picked


def owner_of(node: fx.Node) -> fx.GraphModule:
    """The GraphModule whose graph holds `node` (the captured one, or one nested in it)."""
    return node.graph.owning_module


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


def unit_sites(gm: fx.GraphModule, select: Selector, exclude: Selector, owner: str, attention: str = "heads",
               normalised: bool = True) -> tuple[list[Site], dict[str, str]]:
    """The mask sites for the selected ops, and the selected ops left unmasked (name -> why).

    One site per channel group that a selected op produces, placed at the group's mask points
    (every producer of the group, after its BN/activation), so a selected op masks its whole
    group. Frozen groups (the model output, ops the channel rules cannot follow) and groups
    whose producers do not carry all their channels get no mask. `attention` and `normalised`:
    see :func:`surgery.channels.set_analysis`.
    """
    nodes = select_tree(gm, select, exclude, skip=(UnitMask,))
    channels.set_analysis(gm, attention, normalised)
    groups = channels.channel_groups(gm)
    sites: list[Site] = []
    skipped: dict[str, str] = {}
    seen: dict[int, Site] = {}
    for node, name in nodes.items():
        produced = [g for g in channels.group_of(groups, node) if any(p.node is node for p in g.producers)]
        if not produced:
            skipped[name] = "it produces no channel group"
            continue
        for group in produced:
            if id(group) in seen:
                seen[id(group)].sources.append(node)
                continue
            if group.frozen:
                skipped[name] = f"its channel group is frozen: {group.frozen}"
                continue
            points = list(group.mask_points())
            if not points:
                skipped[name] = "its channel group has no place for one shared mask"
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
    nodes = select_tree(gm, select, exclude, skip=(UnitMask, *skip))
    return [Site(f"{owner}_{str(n.target)}", 0, [MaskPoint(tail(owner_of(n), n), -1)], [n]) for n in nodes]


def axis_kwargs(node: fx.Node, dim: int, mask_dim: int, units: int | None = None,
                runs: tuple[tuple[int, int], ...] | None = None, each: int = 1) -> dict[str, Any]:
    """The keyword arguments of a mask's call at `node` with its `units` on axis `dim`: ``dim``
    unless that is the mask's own axis, ``runs`` where the axis holds some of the units only,
    ``each`` where it holds each unit several times in a row, and ``tile`` where it holds them
    several times over (see :class:`surgery.pipeline.UnitMask`)."""
    shape = node.meta.get("shape")
    rank = len(shape) if isinstance(shape, torch.Size) else None
    same = dim == mask_dim or rank is not None and dim % rank == mask_dim % rank
    kw = {} if same else {"dim": dim}
    if runs is not None:
        kw["runs"] = runs
    elif each > 1:
        kw["each"] = each
    elif units and rank is not None and shape[dim] != units and shape[dim] % units == 0:
        kw["tile"] = shape[dim] // units
    return kw


def call_after(point: MaskPoint, target: str, mask: nn.Module) -> fx.Node:
    """Call `mask`, installed as `target` in the graph of `point`'s node, on that node's output
    (after the node, on `point`'s axis and units), and route the node's users through it."""
    node, g = point.node, point.node.graph
    with g.inserting_after(node):
        new = g.call_module(target, (node,), axis_kwargs(node, point.dim, getattr(mask, "dim", point.dim),
                                                         getattr(mask, "units", None), point.runs, point.each))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    new.meta.update({k: v for k, v in node.meta.items() if k in ("shape", "dtype")})
    return new


def insert_site(gm: fx.GraphModule, site: Site, module: nn.Module) -> list[fx.Node]:
    """Install `module` once and call it after every point of `site` (a shared decision), in
    the graph that holds the points: `gm`'s own, or one nested in it (a site never spans two)."""
    gm = owner_of(site.points[0][0]) if site.points else gm
    target = unique_name(gm, site.name)
    gm.add_submodule(target, module)
    new_nodes = []
    for point in site.points:
        if point.node.op == "output":
            raise SurgeryError(f"{site.name}: cannot place a mask after the graph output")
        if owner_of(point.node) is not gm:
            raise SurgeryError(f"{site.name}: its points lie in different graphs; one mask cannot serve them")
        new_nodes.append(call_after(point, target, module))
    gm.graph.lint()
    gm.recompile()
    return new_nodes
