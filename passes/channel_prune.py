"""ChannelPrune: structured pruning by channel group, with hard masks Shrink can realise.

Channels are scored per group (the coupled channels of every producer, e.g. a residual
stream) and the lowest-scoring ones get a zero in one shared hard mask per group. Nothing is
removed yet: ``Shrink`` does that, exactly. A model captured as an eager shell (detection) is
pruned in every traced graph nested in it, each mask going into its group's graph.

Example::

    >>> import torch, torchvision, surgery
    >>> from passes import ChannelPrune, Shrink
    >>> x = torch.randn(1, 3, 64, 64)
    >>> gm = surgery.compress(torchvision.models.resnet18(weights=None).eval(),
    ...                       [ChannelPrune(ratio=0.5), Shrink()], example_inputs=(x,))
    >>> gm.get_submodule("layer1.0.conv1").out_channels
    32
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

from surgery.channels import ATTENTION_UNITS, ChannelGraph, ChannelGroup, analyze_tree, set_analysis
from surgery.errors import SelectionError
from surgery.graph import layer_of, unique_name
from surgery.pipeline import Context, UnitMask
from surgery.select import Selector, describe, matches

from . import _fields as check
from ._placement import axis_kwargs, select_tree

__all__ = ["ChannelPrune", "HardMask"]

CRITERIA = ("l1", "l2", "bn_scale", "random")


class HardMask(UnitMask):
    """A fixed 0/1 mask: ``keep[j]`` says whether unit j survives."""

    def __init__(self, keep: Tensor, dim: int):
        super().__init__(len(keep), dim)
        self.register_buffer("keep", keep.detach().clone().to(torch.float32))

    def factors(self) -> Tensor:
        return self.keep


@dataclass
class ChannelPrune:
    """Mask the lowest-scoring `ratio` of each channel group's channels.

    Args:
        ratio: fraction of channels to mask (per group with ``scope="local"``, over all
            eligible channels with ``scope="global"``).
        criterion: "l1" / "l2" (norm of the producers' output weights), "bn_scale" (|gamma| of
            the group's BatchNorms, l1 where there is none) or "random".
        select / exclude: which producers (modules) may be pruned; a group is pruned when
            one of its producers is selected and none is excluded.
        scope: "local" or "global" ranking.
        round_to: keep a multiple of this many channels per group (8 suits vector hardware).
        seed: for criterion="random".
        attention: what a unit of attention is. "heads" (default): whole heads go, every head
            keeping its size. "head_dims": every head keeps the same positions of its
            dimension (q with k, v with the output projection's columns), so heads stay and get
            narrower; rotary embeddings keep q and k whole. Recorded in
            ``gm.meta["surgery"]["attention_units"]``, which Shrink's analysis reads back.
        normalised: whether channels that a LayerNorm, an RMSNorm or a mean over channels reads
            may go (a transformer's residual stream, ConvNeXt's channels). Exact in the graph
            form: Shrink rewrites each such op to keep dividing by the original width. A model's
            own classes cannot do that, so pair ``normalised=False`` with ``Shrink(into="modules")``.
            Recorded in ``gm.meta["surgery"]["normalised"]`` for Shrink's analysis.

    Frozen groups and the model's output channels are never masked; every group keeps at
    least one channel (and at least one per group of a grouped convolution).
    """

    ratio: float = 0.5
    criterion: str = "l1"
    # "Conv1D": Hugging Face's GPT-2 linear layer (named, so transformers need not be imported)
    select: Selector = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                        nn.ConvTranspose3d, nn.Linear, "Conv1D", nn.MultiheadAttention, nn.Embedding)
    exclude: Selector = None
    scope: str = "local"
    round_to: int = 1
    seed: int = 0
    attention: str = "heads"
    normalised: bool = True
    keeps_shapes: ClassVar[bool] = True     # mask nodes get their input's shape
    needs_code: ClassVar[bool] = False      # reads the graph and the weights only
    # what it adds to the module tree (name globs, module classes): recipe.check_selections reads it
    inserts: ClassVar[tuple] = ("prune_g*", HardMask)

    def __post_init__(self) -> None:
        check.number("ChannelPrune", "ratio", self.ratio, lo=0, hi=1, hi_open=True)
        check.choice("ChannelPrune", "criterion", self.criterion, CRITERIA)
        check.selector("ChannelPrune", "select", self.select, empty_ok=False)
        check.selector("ChannelPrune", "exclude", self.exclude)
        check.choice("ChannelPrune", "scope", self.scope, ("local", "global"))
        check.number("ChannelPrune", "round_to", self.round_to, lo=1, integer=True)
        check.number("ChannelPrune", "seed", self.seed, lo=0, hi=check.SEED_MAX, integer=True)
        check.choice("ChannelPrune", "attention", self.attention, ATTENTION_UNITS)
        check.flag("ChannelPrune", "normalised", self.normalised)

    def apply(self, gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
        # a selection that matches nothing raises SelectionError with the nearest names, as in
        # Identity and the mask passes; otherwise a typo would return the model unpruned
        selected = select_tree(gm, self.select, self.exclude, skip=(UnitMask,))
        set_analysis(gm, self.attention, self.normalised)
        tree = analyze_tree(gm)  # gm's graph, and those nested under eager code in it (a shell's)
        groups = [g for cg in tree.values() for g in cg.groups]
        self._check_producers(selected, groups)
        points = {g.id: g.mask_points() for g in groups}
        chosen = [g for g in groups if points[g.id] and self._eligible(g)]
        scores = {g.id: self._scores(g) for g in chosen}
        by_group = {gid: seg for cg in tree.values() for gid, seg in _segments(cg).items()}
        segs = {g.id: by_group.get(g.id) for g in chosen}
        if self.scope == "local":
            keep = {g.id: self._keep_local(scores[g.id], segs[g.id]) for g in chosen}
        else:
            keep = self._keep_global(chosen, scores, segs)
        edited: set[fx.GraphModule] = set()
        for g in chosen:
            if keep[g.id].all():
                continue
            first = points[g.id][0][0].graph.owning_module
            mask = HardMask(torch.as_tensor(keep[g.id]), points[g.id][0][1]).train(first.training)
            names: dict[fx.GraphModule, str] = {}  # the mask goes into the graph of each point (one, as a rule)
            for node, dim in points[g.id]:
                owner = node.graph.owning_module
                if owner not in names:
                    names[owner] = name = unique_name(owner, f"prune_g{g.id}")
                    owner.add_submodule(name, mask)
                name = names[owner]
                with owner.graph.inserting_after(node):
                    new = owner.graph.call_module(name, (node,), axis_kwargs(node, dim, mask.dim, mask.units))
                node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
                new.meta.update({k: v for k, v in node.meta.items() if k in ("shape", "dtype")})
            edited.update(names)
        for owner in edited - {gm}:
            # eager code calls a nested graph's generated code, which compress never regenerates
            owner.graph.lint()
            owner.recompile()
        return gm  # compress lints and recompiles gm's own graph (when the next pass or the caller needs the code)

    def _check_producers(self, selected: dict[fx.Node, str], groups: list[ChannelGroup]) -> None:
        """SelectionError when no selected module produces channels (``select="bn1"``): scores and
        masks go to producers only, so such a selection would prune nothing, silently."""
        producers = {p.node for g in groups for p in g.producers}
        owners = {layer_of(p.node, p.graph)[0] for g in groups for p in g.producers}
        if not any(n in producers or name in owners for n, name in selected.items()):
            names = ", ".join(list(selected.values())[:8])
            raise SelectionError(f"ChannelPrune: select={describe(self.select)} matched only modules that produce "
                                 f"no channel group ({names}); select the convolutions or linear layers to prune")

    def _eligible(self, g: ChannelGroup) -> bool:
        """Whether `g` (which has mask points) may be pruned."""
        if g.frozen or g.size < 2:
            return False
        picked = False
        for p in g.producers:
            name, m = layer_of(p.node, p.graph)
            if m is None:
                continue
            if self.exclude is not None and matches(name, m, None, self.exclude) is False:
                return False
            picked |= matches(name, m, self.select, self.exclude)
        return picked

    def _scores(self, g: ChannelGroup) -> np.ndarray:
        s = np.zeros(g.size)
        if self.criterion == "random":
            return np.random.default_rng(self.seed + g.id).random(g.size)
        if self.criterion == "bn_scale":
            for p in g.locals:
                _, m = layer_of(p.node)
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                    w = m.weight.detach().abs().double().numpy()  # small: one value per channel
                    ok = p.channels >= 0
                    np.add.at(s, p.channels[ok], w[ok])
            if s.any():
                return s
        for p in g.producers:
            # the tensor the producer makes its channels with, on the axis the rule recorded
            # (a conv's weight on 0, a transposed conv's or an embedding's on 1)
            held = [(o, n, d) for o, n, d in p.params if n == "weight"] or p.params[:1]
            w = getattr(held[0][0], held[0][1], None) if held else None
            if not isinstance(w, torch.Tensor) or w.dim() == 0:
                continue
            wd = held[0][2]
            w = w.detach().movedim(wd, 0).reshape(w.shape[wd], -1)
            # one pass over the weight, no |w| or w**2 temporary (weights are the big tensors here)
            n = torch.linalg.vector_norm(w, 2 if self.criterion == "l2" else 1, dim=1).double().numpy()
            if len(n) != len(p.channels):
                continue
            ok = p.channels >= 0
            np.add.at(s, p.channels[ok], n[ok])
        return s

    def _count(self, n: int, frac_keep: float) -> int:
        k = max(1, math.ceil(n * frac_keep - 1e-9))
        if self.round_to > 1:
            k = min(n, max(self.round_to, int(math.ceil(k / self.round_to)) * self.round_to))
        return k

    def _keep_local(self, s: np.ndarray, seg: np.ndarray | None) -> np.ndarray:
        keep = np.zeros(len(s), dtype=bool)
        if seg is None:
            k = self._count(len(s), 1 - self.ratio)
            keep[np.argsort(-s, kind="stable")[:k]] = True
            return keep
        per = seg.shape[1]
        k = max(1, min(per, math.ceil(per * (1 - self.ratio) - 1e-9)))
        best = np.argsort(-s[seg], axis=1, kind="stable")[:, :k]  # every segment at once
        keep[np.take_along_axis(seg, best, axis=1)] = True
        return keep

    def _keep_global(self, groups, scores, segs) -> dict[int, np.ndarray]:
        norm = {gid: s / (s.mean() + 1e-12) for gid, s in scores.items()}
        allv = np.concatenate(list(norm.values())) if norm else np.zeros(0)
        if not len(allv):
            return {}
        thr = np.quantile(allv, self.ratio)
        out = {}
        for g in groups:
            frac = float((norm[g.id] > thr).mean())
            out[g.id] = _Local(self, frac).keep(norm[g.id], segs[g.id])
        return out


class _Local:
    def __init__(self, cp: ChannelPrune, frac_keep: float):
        self.cp, self.frac = cp, frac_keep

    def keep(self, s, seg):
        saved = self.cp.ratio
        try:
            object.__setattr__(self.cp, "ratio", 1 - self.frac)
            return self.cp._keep_local(s, seg)
        finally:
            object.__setattr__(self.cp, "ratio", saved)


def _segments(cg: ChannelGraph) -> dict[int, np.ndarray]:
    """Per group id: its channels split into equal segments by the first grouped convolution
    that carries all of them (as producer or reader), if one does."""
    out: dict[int, np.ndarray] = {}
    for p in cg.places:
        if p.groups > 1 and p.role in ("producer", "reader"):
            chans = cg.chan_of_elem[p.ids]
            group = cg.groups[int(cg.chan_group[chans[0]])]  # chan_group counts within this graph
            if group.id not in out and len(chans) == group.size:
                out[group.id] = cg.local_index[chans].reshape(p.groups, -1)
    return out
