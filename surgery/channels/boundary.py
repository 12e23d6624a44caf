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
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..copying import held_tensor
from ..inplace import rewrite_inplace

if TYPE_CHECKING:
    from .groups import ChannelGraph

__all__ = ["Boundary", "shared_tensors", "annotated", "prepare", "check_boundary"]


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
    """Freeze what crosses `cg`'s boundary unseen: tensors held outside the graph too, and channels
    along axes whose size changes between calls. (Outputs freeze in the walk itself.)"""
    b = cg.boundary
    if b is None:
        return
    inside = b.path + "."
    if b.shared:
        for p in cg.places:
            for owner, name, _ in p.params:
                t = held_tensor(owner, name)
                outside = [q for q in b.shared.get(id(t), ()) if not q.startswith(inside)] if t is not None else ()
                if outside:
                    cg.frozen.append((np.unique(p.ids), f"{outside[0]} holds the same tensor outside {b.path!r}, "
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
                                                   f"the calls that eager code makes to {b.path!r}"))
