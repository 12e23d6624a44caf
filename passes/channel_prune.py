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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

from surgery.capture import surgery_meta
from surgery.channels import ATTENTION_UNITS, ChannelGroup, analyze_tree, set_analysis
from surgery.errors import SelectionError, SurgeryError
from surgery.graph import layer_of, unique_name
from surgery.pipeline import Context, UnitMask
from surgery.select import Selector, describe, matches

from . import _fields as check
from ._budget import Costs, allocate
from ._importance import DATA_CRITERIA, GRADIENT_CRITERIA, WEIGHT_CRITERIA, data_scores, weight_scores
from ._placement import call_after, select_tree
from ._segments import segments

__all__ = ["ChannelPrune", "HardMask"]

CRITERIA = WEIGHT_CRITERIA + DATA_CRITERIA


class HardMask(UnitMask):
    """A fixed 0/1 mask: ``keep[j]`` says whether unit j survives."""

    def __init__(self, keep: Tensor, dim: int):
        super().__init__(len(keep), dim)
        self.register_buffer("keep", keep.detach().clone().to(torch.float32))

    def factors(self) -> Tensor:
        return self.keep


@dataclass
class ChannelPrune:
    """Mask the lowest-scoring channels of each channel group (Shrink then removes them).

    Args:
        ratio: fraction of channels to mask (per group with ``scope="local"``, over all
            eligible channels with ``scope="global"``). Give a target instead to prune to a budget.
        criterion: how channels are scored (see :mod:`passes._importance`). Weight criteria:
            "l1" / "l2" (norm of the producers' output weights), "bn_scale" (|gamma| of the
            group's BatchNorms, l1 where there is none), "lamp", "random". Data criteria, which
            need `calibration`: "activation" (Wanda: |W| times the input's norm, forward only),
            "taylor" (|w * dL/dw| summed over the group) and "hessian" (diagonal Fisher, OBD),
            the last two with `loss_fn`. Scores are always summed over a group's coupled layers.
        calibration: batches for the data criteria, iterated once per step: each the model's
            inputs (a tensor, a tuple, a dict of keyword inputs) or an ``(inputs, target)`` pair
            (see :func:`passes._importance.split_batch`). A list or a DataLoader, not a generator,
            when ``steps > 1``.
        loss_fn: ``loss_fn(output, target) -> scalar tensor``, for "taylor" and "hessian".
        target_macs: prune to a budget instead of a ratio: keep this fraction of the model's
            MACs (on the example inputs), within about 2%.
        target_params: the same for the parameters (give one target, or a ratio). Channels
            are ranked across groups by their scores divided by their group's mean (LAMP's as
            they are); see :mod:`passes._budget` for how the result is predicted.
        steps: prune in this many stages (the ratio, or the budget's cut, in equal steps), the
            scores recomputed on the masked model at each, and `finetune` called between them.
        finetune: ``finetune(model, step)``, called after each stage but the last with the masked
            GraphModule (masked channels stay zero while it trains). Fine-tune after Shrink as usual.
        select: which producers (modules) may be pruned; a group is pruned when one of its
            producers is selected and none is excluded.
        exclude: producers that may not be pruned.
        scope: "local" or "global" ranking (for `ratio`; budgets always rank globally).
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
            It also leaves the groups whose producers each carry some of the channels (masked
            over runs of units: a dense block, Res2Net's and CSP's splits), whose pieces' widths
            a model's code writes as numbers (split sizes) that its classes keep.
            Recorded in ``gm.meta["surgery"]["normalised"]`` for Shrink's analysis.

    Frozen groups and the model's output channels are never masked; every group keeps at
    least one channel (and at least one per group of a grouped convolution). The last step's
    scores are in ``gm.meta["surgery"]["channel_scores"]`` (by group id: its layers and scores).
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
    calibration: Iterable | None = field(default=None, repr=False)
    loss_fn: Callable[[Any, Any], Tensor] | None = field(default=None, repr=False)
    target_macs: float | None = None
    target_params: float | None = None
    steps: int = 1
    finetune: Callable[[fx.GraphModule, int], Any] | None = field(default=None, repr=False)
    keeps_shapes: ClassVar[bool] = True     # mask nodes get their input's shape
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
        check.number("ChannelPrune", "steps", self.steps, lo=1, integer=True)
        for name in ("target_macs", "target_params"):
            if getattr(self, name) is not None:
                check.number("ChannelPrune", name, getattr(self, name), lo=0, hi=1, lo_open=True)
        if self.target_macs is not None and self.target_params is not None:
            raise SurgeryError("ChannelPrune: give target_macs or target_params, not both")
        if self.target is not None and self.ratio != 0.5:
            raise SurgeryError(f"ChannelPrune: give a ratio or a target, not both (ratio={self.ratio}, "
                               f"{self.target[0]}={self.target[1]})")
        if self.calibration is not None and (isinstance(self.calibration, (str, bytes, Tensor, dict))
                                             or not isinstance(self.calibration, Iterable)):
            hint = ": wrap one batch in a list" if isinstance(self.calibration, Tensor) else ""
            raise SurgeryError(f"ChannelPrune: calibration is an iterable of batches (a list, a DataLoader), got "
                               f"{type(self.calibration).__name__}{hint}")
        data = self.criterion in DATA_CRITERIA
        if data and self.calibration is None:
            raise SurgeryError(f"ChannelPrune: criterion={self.criterion!r} scores channels on data: pass "
                               "calibration=batches (an iterable of inputs or (inputs, target) pairs)")
        if not data and self.calibration is not None:
            raise SurgeryError(f"ChannelPrune: criterion={self.criterion!r} reads the weights only, so calibration "
                               f"would be unused; the data criteria are {', '.join(map(repr, DATA_CRITERIA))}")
        if self.criterion in GRADIENT_CRITERIA and self.loss_fn is None:
            raise SurgeryError(f"ChannelPrune: criterion={self.criterion!r} needs loss_fn(output, target) for its "
                               "gradients (and (inputs, target) calibration batches)")
        for name in ("loss_fn", "finetune"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise SurgeryError(f"ChannelPrune: {name} must be callable, got {type(getattr(self, name)).__name__}")
        if self.finetune is not None and self.steps < 2:
            raise SurgeryError("ChannelPrune: finetune runs between steps; give steps >= 2")

    @property
    def target(self) -> tuple[str, float] | None:
        """("target_macs", fraction) or ("target_params", fraction), if a budget is set."""
        if self.target_macs is not None:
            return "target_macs", self.target_macs
        if self.target_params is not None:
            return "target_params", self.target_params
        return None

    @property
    def needs_code(self) -> bool:
        """Weight criteria read the graph and the weights only; data criteria and stages run the model."""
        return self.criterion in DATA_CRITERIA or self.steps > 1

    def apply(self, gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
        # a selection that matches nothing raises SelectionError with the nearest names, as in
        # Identity and the mask passes; otherwise a typo would return the model unpruned
        selected = select_tree(gm, self.select, self.exclude, skip=(UnitMask,))
        set_analysis(gm, self.attention, self.normalised)
        tree = analyze_tree(gm)  # gm's graph, and those nested under eager code in it (a shell's)
        groups = [g for cg in tree.values() for g in cg.groups]
        self._check_producers(selected, groups)
        points = {g.id: g.mask_points() for g in groups}
        # normalised=False, for a model shrunk into its own classes, also leaves groups that need
        # masks over runs of units: their pieces' widths are in the model's code (split sizes)
        chosen = [g for g in groups if points[g.id] and self._eligible(g) and
                  (self.normalised or not any(pt.runs or pt.each > 1 for pt in points[g.id]))]
        by_group = {gid: seg for cg in tree.values() for gid, seg in segments(cg).items()}
        segs = {g.id: by_group.get(g.id) for g in chosen}
        costs = None
        if self.target is not None:
            if ctx.example_inputs is None and self.target_macs is not None:
                raise SurgeryError("ChannelPrune: target_macs counts MACs on example inputs: pass them to "
                                   "compress(..., example_inputs=(x,))")
            costs = Costs("macs" if self.target_macs is not None else "params", gm, tree, chosen,
                          ctx.example_inputs)
        kept = {g.id: np.ones(g.size, dtype=bool) for g in chosen}
        masks: dict[int, HardMask] = {}
        for step in range(1, self.steps + 1):
            scores = self._step_scores(gm, chosen, kept)
            keep = self._decide(step, chosen, scores, segs, costs)
            if costs is not None:  # a budget counts what Shrink removes: drop groups whose masks it would keep
                stuck = self._place_removable(gm, chosen, points, {gid: keep[gid] & kept[gid] for gid in kept},
                                              masks)
                if stuck:
                    chosen = [g for g in chosen if g.id not in stuck]
                    keep = self._decide(step, chosen, {g.id: scores[g.id] for g in chosen}, segs, costs)
                    keep.update({gid: np.ones_like(kept[gid]) for gid in stuck})
            kept = {gid: keep[gid] & kept[gid] for gid in kept}
            self._place(gm, chosen, points, kept, masks)
            if step < self.steps and self.finetune is not None:
                self.finetune(gm, step)
        surgery_meta(gm)["channel_scores"] = {
            g.id: {"layers": [layer_of(p.node, p.graph)[0] for p in g.producers], "scores": scores[g.id]}
            for g in chosen}
        return gm  # compress lints and recompiles gm's own graph (when the next pass or the caller needs the code)

    def _step_scores(self, gm: fx.GraphModule, chosen: list[ChannelGroup],
                     kept: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Every chosen group's scores, channels masked at an earlier step at -inf."""
        if self.criterion in DATA_CRITERIA:  # runs gm: compress regenerated its code (needs_code), _place too
            scores = data_scores(self.criterion, gm, chosen, self.calibration, self.loss_fn)
        else:
            scores = {g.id: weight_scores(self.criterion, g, self.seed) for g in chosen}
        return {gid: np.where(kept[gid], s, -np.inf) for gid, s in scores.items()}

    def _decide(self, step: int, chosen: list[ChannelGroup], scores: dict[int, np.ndarray],
                segs: dict[int, list[np.ndarray] | None], costs: Costs | None) -> dict[int, np.ndarray]:
        """The channels each group keeps after `step` of `steps` (equal steps of the ratio or the cut)."""
        if costs is not None:
            goal = 1 - (1 - self.target[1]) * step / self.steps
            comparable = {gid: s if self.criterion == "lamp" else _normalised(s) for gid, s in scores.items()}
            return allocate(goal, costs.kind, comparable, lambda gid, s, frac: self._keep(s, segs[gid], 1 - frac),
                            costs)
        ratio = self.ratio * step / self.steps
        if self.scope == "local":
            return {g.id: self._keep(scores[g.id], segs[g.id], ratio) for g in chosen}
        return self._keep_global(chosen, scores, segs, ratio)

    def _place_removable(self, gm: fx.GraphModule, chosen: list[ChannelGroup], points: dict,
                         keep: dict[int, np.ndarray], masks: dict[int, HardMask]) -> set[int]:
        """Place `keep`'s masks and ask Shrink's planner which of them it would realise: the ids of
        groups that keep masked channels (a LayerNorm reading a nonzero value in them, a bias
        after the mask). Their masks are opened again (all ones); Shrink would not remove them,
        so they would only cost accuracy."""
        from surgery.shrink.plan import Decider
        self._place(gm, chosen, points, keep, masks)
        by_mask = {id(m): gid for gid, m in masks.items()}
        stuck: set[int] = set()
        for cg in analyze_tree(gm).values():
            decider = Decider(cg)
            decider.run()
            held = decider.candidate & decider.keep  # masked, and kept all the same
            if not held.any():
                continue
            for p in cg.places:
                if p.role == "mask" and held[cg.chan_of_elem[p.ids]].any():
                    gid = by_mask.get(id(p.node.graph.owning_module.get_submodule(str(p.node.target))))
                    if gid is not None:
                        stuck.add(gid)
        for gid in stuck:
            masks[gid].keep.fill_(1.0)
        return stuck

    def _place(self, gm: fx.GraphModule, chosen: list[ChannelGroup], points: dict, kept: dict[int, np.ndarray],
               masks: dict[int, HardMask]) -> None:
        """Insert a HardMask for each group that loses channels (or update the one placed at an
        earlier step)."""
        edited: set[fx.GraphModule] = set()
        for g in chosen:
            if g.id in masks:
                masks[g.id].keep.copy_(torch.as_tensor(kept[g.id], dtype=torch.float32))
                continue
            if kept[g.id].all():
                continue
            first = points[g.id][0].node.graph.owning_module
            mask = HardMask(torch.as_tensor(kept[g.id]), points[g.id][0].dim).train(first.training)
            masks[g.id] = mask
            names: dict[fx.GraphModule, str] = {}  # the mask goes into the graph of each point (one, as a rule)
            for point in points[g.id]:
                owner = point.node.graph.owning_module
                if owner not in names:
                    names[owner] = name = unique_name(owner, f"prune_g{g.id}")
                    owner.add_submodule(name, mask)
                call_after(point, names[owner], mask)
            edited.update(names)
        for owner in edited:
            # eager code calls a nested graph's generated code, which compress never regenerates;
            # gm's own is regenerated here only when the model runs again (data criteria, stages)
            if owner is not gm or self.needs_code:
                owner.graph.lint()
                owner.recompile()

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

    def _count(self, n: int, frac_keep: float) -> int:
        k = max(1, math.ceil(n * frac_keep - 1e-9))
        if self.round_to > 1:
            k = min(n, max(self.round_to, int(math.ceil(k / self.round_to)) * self.round_to))
        return k

    def _keep(self, s: np.ndarray, seg: list[np.ndarray] | None, ratio: float) -> np.ndarray:
        """The channels to keep of one group with scores `s`: the best ``1 - ratio`` of them
        (rounded), or of each of its segments (:func:`passes._segments.segments`) and of the channels in none."""
        keep = np.zeros(len(s), dtype=bool)
        if seg is None:
            k = self._count(len(s), 1 - ratio)
            keep[np.argsort(-s, kind="stable")[:k]] = True
            return keep
        free = np.ones(len(s), dtype=bool)
        for part in seg:
            free[part] = False
        for part in [*seg, np.flatnonzero(free)] if free.any() else seg:
            k = max(1, min(len(part), math.ceil(len(part) * (1 - ratio) - 1e-9)))
            keep[part[np.argsort(-s[part], kind="stable")[:k]]] = True
        return keep

    def _keep_global(self, groups: list[ChannelGroup], scores: dict[int, np.ndarray],
                     segs: dict[int, list[np.ndarray] | None], ratio: float) -> dict[int, np.ndarray]:
        norm = {gid: _normalised(s) for gid, s in scores.items()}
        allv = np.concatenate([v[np.isfinite(v)] for v in norm.values()]) if norm else np.zeros(0)
        if not len(allv):
            return {g.id: np.ones(g.size, dtype=bool) for g in groups}
        thr = np.quantile(allv, ratio)
        return {g.id: self._keep(norm[g.id], segs[g.id], 1 - float((norm[g.id] > thr).mean())) for g in groups}


def _normalised(s: np.ndarray) -> np.ndarray:
    """Scores divided by the mean of the group's finite ones (channels masked earlier stay -inf)."""
    finite = s[np.isfinite(s)]
    return s / (finite.mean() + 1e-12) if len(finite) else s
