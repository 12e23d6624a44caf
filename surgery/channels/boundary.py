"""The boundary of a nested graph: what the analysis of a traced graph that eager code calls
(a shell's backbone, FPN or head; see :mod:`surgery.nested`) must hold fixed.

The analysis of such a graph is the analysis of any graph (:class:`~surgery.channels.ChannelGraph`),
with its edges made explicit. Its placeholders carry channels that eager code made: they are
untracked, as a model's inputs are, so no group owns them. What it returns is read by eager code,
which no rule follows: the channels of its outputs freeze, with the boundary named. And three
things the walk cannot see from inside are checked here:

- a tensor of the graph that the module tree also holds outside it (a weight tied to an eager
  layer, a module shared with eager code) would be resized behind eager code's back;
- eager code may call the graph several times with different sizes (a head, once per feature
  level): channels that vary along an axis whose size changes between calls cannot be cut;
- capture rewrites the top graph's in-place ops before anything analyses it, but not a nested
  graph's: :func:`prepare` does it here, so both are analysed alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..copying import held_tensor
from ..inplace import rewrite_inplace
from ..nested import output_items

if TYPE_CHECKING:
    from .groups import ChannelGraph

__all__ = ["Boundary", "shared_tensors", "annotated", "prepare", "check_boundary", "handoff_components", "seed",
           "handed_leaves"]


@dataclass
class Boundary:
    """Where a nested graph meets eager code: its qualified module path in the root module, and
    the root's tensors held under more than one name (id -> every qualified name)."""

    path: str
    shared: dict[int, list[str]] = field(default_factory=dict)

    def output_reason(self, node: fx.Node) -> str:
        return f"crosses the eager boundary of {self.path!r} (output), through {node.name!r}"


def shared_tensors(root: nn.Module) -> dict[int, list[str]]:
    """The parameters and buffers that `root`'s tree holds under more than one qualified name
    (a module reachable twice counts twice: eager code may reach it by either name)."""
    names: dict[int, list[str]] = {}
    for prefix, m in root.named_modules(remove_duplicate=False):
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is not None:
                    names.setdefault(id(t), []).append(f"{prefix}.{name}" if prefix else name)
    return {k: v for k, v in names.items() if len(v) > 1}


def annotated(gm: fx.GraphModule) -> bool:
    """Whether `gm`'s nodes have shapes (a nested graph that the example run never called has none)."""
    return any("shape" in n.meta for n in gm.graph.nodes if n.op != "placeholder")


def prepare(gm: fx.GraphModule) -> None:
    """Normalise a nested graph's in-place ops as capture does the top graph's (exact, idempotent)."""
    rewrite_inplace(gm)


def check_boundary(cg: "ChannelGraph") -> None:
    """Freeze what crosses the boundaries of `cg`'s graphs unseen: tensors held outside the graph
    too, and channels along axes whose size changes between calls. (Outputs freeze in the walk itself.)"""
    if all(b is None for _, b in cg.parts):
        return
    shared = next(b.shared for _, b in cg.parts if b is not None)
    if shared:
        for p in cg.places:
            path = cg.part_path(p.node)
            for owner, name, _ in p.params:
                t = held_tensor(owner, name)
                outside = [q for q in shared.get(id(t), ()) if not q.startswith(path + ".")] if t is not None else ()
                if outside:
                    cg.frozen.append((np.unique(p.ids), f"{outside[0]} holds the same tensor outside {path!r}, "
                                                        "so eager code may use it: it crosses the eager boundary"))
                    break
    for node, lay in cg.layouts.items():
        axes = node.meta.get("shape_varies")
        if axes is None:
            continue
        shapes = node.meta.get("shape")
        parts = lay if isinstance(lay, tuple) else (lay,)
        shapes = shapes if isinstance(shapes, tuple) and not isinstance(shapes, torch.Size) else (shapes,) * len(parts)
        for part, shape in zip(parts, shapes):
            if not isinstance(part, np.ndarray):
                continue
            lead = len(shape) - part.ndim if isinstance(shape, torch.Size) else 0  # layouts align from the end
            cut = [d for d in (range(lead, lead + part.ndim) if axes is True else axes)
                   if 0 <= d - lead < part.ndim and part.shape[d - lead] > 1]
            if cut:
                cg.frozen.append((np.unique(part), f"{node.name!r} changes its size along axis {cut[0]} between "
                                                   f"the calls that eager code makes to {cg.part_path(node)!r}"))


# ------------------------------------------------------------------------------------ hand-offs
# Eager code often hands what one nested graph returns straight to another (an SSD's feature
# maps, from its backbone to its head). The run that records shapes also records these hand-offs
# (:class:`surgery.nested._Handoffs`: a tensor eager code computes with, or that the model
# returns, is none): the graphs are then walked as one, the head's placeholder taking the
# layout of the backbone's output, so that channels are followed across the boundary.

def handoff_components(subs: dict[str, fx.GraphModule]) -> list[list[str]]:
    """`subs` (path -> graph) in components of graphs joined by hand-offs, each in an order in
    which a graph comes after every graph that hands it a tensor (module order otherwise)."""
    feeds: dict[str, set[str]] = {p: set() for p in subs}
    parent = {p: p for p in subs}

    def root(p: str) -> str:
        while parent[p] != p:
            p = parent[p]
        return p

    for path, gm in subs.items():
        for ph in gm.graph.find_nodes(op="placeholder"):
            for src, _ in ph.meta.get("handoff", {}).values():
                if src in subs and src != path:
                    feeds[path].add(src)
                    parent[root(src)] = root(path)
    components: dict[str, list[str]] = {}
    done: set[str] = set()

    def place(p: str) -> None:  # sources first (hand-offs follow the run's order: no cycles)
        if p in done:
            return
        done.add(p)
        for src in sorted(feeds[p], key=list(subs).index):
            place(src)
        components.setdefault(root(p), []).append(p)

    for p in subs:
        place(p)
    return sorted(components.values(), key=lambda ps: min(map(list(subs).index, ps)))


def seed(cg: "ChannelGraph", ph: fx.Node) -> None:
    """A placeholder that holds what an earlier graph of `cg` returned (a tensor, or items of a
    list): it takes that output's layout, so the channels are the same elements."""
    handoff = ph.meta.get("handoff")
    if not handoff:
        return
    outputs = {b.path: g.graph.find_nodes(op="output")[0] for g, b in cg.parts if b is not None}
    items: dict[int | None, tuple[np.ndarray, Any]] = {}  # item -> (layout, known values)
    for item, (src, leaf) in handoff.items():
        out = outputs.get(src)
        leaves = output_items(out.args[0]) if out is not None else []
        node = leaves[leaf] if leaf < len(leaves) and isinstance(leaves[leaf], fx.Node) else None
        if isinstance(cg.layouts.get(node), np.ndarray):
            items[item] = cg.layouts[node], cg.values.get(node)
    if None in items:
        cg.layouts[ph], cg.values[ph] = items[None]
    elif items:
        shape = ph.meta.get("shape")
        n = len(shape) if isinstance(shape, tuple) and not isinstance(shape, torch.Size) else max(items) + 1
        cg.layouts[ph] = tuple(items[j][0] if j in items else None for j in range(n))
        cg.values[ph] = tuple(items[j][1] if j in items else None for j in range(n))


def handed_leaves(cg: "ChannelGraph", out: fx.Node) -> set[int]:
    """The leaves of output node `out` that go only to graphs walked with it (their readers are
    seen): not frozen at the boundary."""
    if len(cg.parts) == 1 or not out.meta.get("handed"):
        return set()
    walked = {b.path for _, b in cg.parts if b is not None}
    leaves = output_items(out.args[0])
    return {leaf for leaf, paths in out.meta["handed"].items() if set(paths) <= walked and leaf < len(leaves)
            and isinstance(leaves[leaf], fx.Node) and isinstance(cg.layouts.get(leaves[leaf]), np.ndarray)}
