"""Budgets for ChannelPrune: keep a target fraction of the model's MACs or parameters.

Channels are ranked across groups by their scores normalised per group (divided by the group's
mean score, so that a channel competes by its importance relative to its own layer's; LAMP scores
are comparable across layers as they are). Removing channels in that order sets every group's keep
fraction, rounded as ``round_to`` and grouped convolutions ask, and a bisection over how many go
finds where the cost model meets the target.

The cost model predicts what Shrink will leave, from the channel analysis:

- parameters: every weight, bias and norm scale that a group's channels live in shrinks along
  that axis; a tensor in two groups (a conv's output and input channels) by the product;
- MACs: each graph node's MACs, counted once on the example inputs (:func:`surgery.io.macs.node_macs`),
  scale with the fraction of its output that stays times, for a contraction (convolution, linear
  layer, matmul, attention), the fraction of the contracted input axis that stays. A node whose
  output the analysis does not lay out (an opaque module) keeps its MACs.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgery.channels import ChannelGraph, ChannelGroup
from surgery.errors import warn
from surgery.io.macs import node_macs

__all__ = ["Costs", "allocate"]

Keep = dict[int, np.ndarray]

_CONTRACT_FUNCTIONS = {F.linear: (0, -1), torch.matmul: (0, -1), operator.matmul: (0, -1), torch.bmm: (0, -1),
                       torch.mm: (0, -1), torch.addmm: (1, -1), torch.baddbmm: (1, -1),
                       F.scaled_dot_product_attention: (0, -1), F.conv1d: (0, 1), F.conv2d: (0, 1),
                       F.conv3d: (0, 1)}
_CONTRACT_METHODS = {"matmul": (0, -1), "bmm": (0, -1), "mm": (0, -1)}


def _contracted(node: fx.Node) -> tuple[int, int] | None:
    """(argument, axis) of the input axis a contraction sums over, if `node` is one."""
    if node.op == "call_module":
        try:
            m = node.graph.owning_module.get_submodule(str(node.target))
        except AttributeError:
            return None
        if isinstance(m, nn.modules.conv._ConvNd):
            depthwise = m.groups > 1 and m.groups == m.in_channels and not m.transposed
            return None if depthwise else (0, 1)
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            return 0, -1
        return None
    if node.op == "call_function":
        return _CONTRACT_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _CONTRACT_METHODS.get(str(node.target))
    return None


class Costs:
    """Predicted fraction of parameters (``kind="params"``) or MACs (``"macs"``) that Shrink
    leaves for a keep decision per group (see the module doc)."""

    def __init__(self, kind: str, gm: fx.GraphModule, tree: dict[Any, ChannelGraph], groups: list[ChannelGroup],
                 inputs: Any):
        self.kind = kind
        self.cgs = {id(g.graph): cg for cg in tree.values() for g, _ in cg.parts}
        owner = {g.id: cg for cg in tree.values() for g in cg.groups}
        # per analysis: the global channels of each group, in the group's local order
        self.members: dict[int, tuple[ChannelGraph, np.ndarray]] = {}
        for g in groups:
            cg = owner[g.id]
            idx = g.id - cg.first_id
            chans = np.nonzero(cg.chan_group == idx)[0]
            self.members[g.id] = cg, chans[np.argsort(cg.local_index[chans], kind="stable")]
        if kind == "params":
            self._init_params(gm, groups)
        else:
            self._init_macs(gm, inputs)

    # ------------------------------------------------------------------ parameters
    def _init_params(self, gm: fx.GraphModule, groups: list[ChannelGroup]) -> None:
        self.total = sum(p.numel() for p in gm.parameters())
        self.tensors: dict[int, tuple[int, tuple[int, ...], list[tuple[int, int, np.ndarray]]]] = {}
        for g in groups:
            for p in g.places():
                for owner, name, axis in p.params:
                    t = getattr(owner, name, None)
                    if not isinstance(t, nn.Parameter) or t.dim() == 0:
                        continue
                    axis %= t.dim()
                    if t.shape[axis] != len(p.channels):
                        continue
                    entry = self.tensors.setdefault(id(t), (t.numel(), tuple(t.shape), []))
                    entry[2].append((axis, g.id, p.channels))

    def _params(self, keep: Keep) -> float:
        removed = 0.0
        for numel, shape, maps in self.tensors.values():
            axes: dict[int, np.ndarray] = {}
            for axis, gid, chans in maps:
                k = keep.get(gid)
                if k is None:
                    continue
                line = axes.setdefault(axis, np.ones(shape[axis], dtype=bool))
                ok = chans >= 0
                line[ok] &= k[chans[ok]]
            frac = 1.0
            for line in axes.values():
                frac *= line.mean()
            removed += numel * (1 - frac)
        return (self.total - removed) / max(self.total, 1)

    # ------------------------------------------------------------------ MACs
    def _init_macs(self, gm: fx.GraphModule, inputs: Any) -> None:
        counted = node_macs(gm, inputs)
        self.total = sum(counted.values())
        self.fixed = 0
        self.nodes: list[tuple[int, ChannelGraph, np.ndarray | None, tuple[np.ndarray, int] | None]] = []
        for node, macs in counted.items():
            cg = self.cgs.get(id(node.graph))
            lay = cg.layouts.get(node) if cg is not None else None
            if not isinstance(lay, np.ndarray):
                self.fixed += macs
                continue
            out = cg.chan_of_elem[lay]
            contract = None
            where = _contracted(node)
            if where is not None and where[0] < len(node.args) and isinstance(node.args[where[0]], fx.Node):
                src = cg.layouts.get(node.args[where[0]])
                if isinstance(src, np.ndarray) and src.ndim:
                    axis = where[1] % src.ndim
                    if src.shape[axis] > 1:
                        contract = np.moveaxis(cg.chan_of_elem[src], axis, 0).reshape(src.shape[axis], -1), axis
            self.nodes.append((macs, cg, out, contract))

    def _removed(self, keep: Keep) -> dict[int, np.ndarray]:
        """Per analysis (by id): removed flags over its global channels."""
        out: dict[int, np.ndarray] = {}
        for gid, k in keep.items():
            cg, chans = self.members[gid]
            r = out.setdefault(id(cg), np.zeros(len(cg.chan_group), dtype=bool))
            r[chans] = ~k
        return out

    def _macs(self, keep: Keep) -> float:
        removed = self._removed(keep)
        kept = float(self.fixed)
        for macs, cg, out, contract in self.nodes:
            r = removed.get(id(cg))
            if r is None:
                kept += macs
                continue
            frac = float((~r[out]).mean())
            if contract is not None:
                frac *= float((~r[contract[0]]).any(axis=1).mean())
            kept += macs * frac
        return kept / max(self.total, 1)

    def __call__(self, keep: Keep) -> float:
        return self._params(keep) if self.kind == "params" else self._macs(keep)


def allocate(target: float, kind: str, scores: dict[int, np.ndarray],
             keep_for: Callable[[int, np.ndarray, float], np.ndarray], costs: Costs) -> Keep:
    """Keep decisions per group that bring the predicted `kind` fraction closest to `target`.

    Every channel of every group is ranked by `scores` (comparable across groups; -inf: masked
    at an earlier step, always out), ties in rank order; a bisection over how many channels go, in
    that order, sets each group's fraction to keep. Counting channels rather than thresholding
    scores matters where many tie (units a ReLU never opens on the calibration data score 0).
    ``keep_for(group id, scores, fraction to keep)`` rounds one group's decision."""
    if not scores:
        return {}
    gids = list(scores)
    flat = np.concatenate([scores[g] for g in gids])
    owner = np.repeat(np.arange(len(gids)), [len(scores[g]) for g in gids])[np.argsort(flat, kind="stable")]
    sizes = np.array([len(scores[g]) for g in gids], dtype=np.float64)

    def at(m: int) -> Keep:  # the first m channels in rank order go
        frac = 1 - np.bincount(owner[:m], minlength=len(gids)) / sizes
        return {g: keep_for(g, scores[g], float(f)) for g, f in zip(gids, frac)}

    lo, hi = int(np.isneginf(flat).sum()), len(flat)
    if costs(at(lo)) <= target:
        return at(lo)
    lowest = costs(at(hi))
    if lowest > target:
        warn(f"ChannelPrune: target_{kind}={target:g} cannot be reached: pruning every eligible group to its "
             f"minimum leaves {lowest:.3f} of the {'MACs' if kind == 'macs' else 'parameters'}")
        return at(hi)
    while hi - lo > 1:  # invariant: cost(at(lo)) > target >= cost(at(hi)); the cost falls as m grows
        mid = (lo + hi) // 2
        if costs(at(mid)) > target:
            lo = mid
        else:
            hi = mid
    below, above = at(hi), at(lo)
    return above if abs(costs(above) - target) < abs(costs(below) - target) else below
