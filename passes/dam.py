"""DAM: discriminative masking (Bu et al., NeurIPS 2021) as a graph pass.

Each mask scales unit j by ``relu(tanh(alpha^2 (mu_j + beta)))`` with ``mu_j = 5 j / n`` fixed
and ordered, ``alpha = 1`` fixed and one learnable ``beta`` (initially 1). The penalty pushes
beta down, so the gates close one by one from unit 0 upward: the mask learns *how many* units
a layer needs, and the ordering makes the decision stable.

Example::

    >>> import torch, surgery
    >>> from torch import nn
    >>> from passes import DAM
    >>> net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    >>> gm = surgery.compress(net, [DAM(select=nn.Linear, exclude="2", lam=0.1)], (torch.randn(2, 64),))
    >>> [tuple(m.kept().shape) for m in surgery.masks(gm).values()]
    [(128,)]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
from torch import Tensor, nn

from surgery.channels import ATTENTION_UNITS
from surgery.pipeline import Context, UnitMask, whole
from surgery.select import Selector

from . import _fields as check
from ._placement import insert_site, unit_sites

__all__ = ["DAM", "DAMMask"]


class DAMMask(UnitMask):
    """An ordered gate over `units` units: ``relu(tanh(alpha^2 (mu + beta)))``.

    `weight` scales the penalty ``clamp(beta, min=-5)``; the DAM pass sets it to lam / (number
    of masks) so that the sum over masks is lam x their mean. During the first `cold_start`
    steps beta gets no gradient (the network first learns with every unit open).
    """

    def __init__(self, units: int, dim: int, weight: float = 0.1, cold_start: int = 0):
        super().__init__(units, dim)
        self.register_buffer("mu", torch.arange(units, dtype=torch.float32) * (5.0 / units))
        self.register_buffer("alpha", torch.ones(1))
        self.beta = nn.Parameter(torch.ones(1))
        self.weight = float(weight)
        self.cold_start = int(cold_start)
        # a buffer, so that the schedule is saved with the model and identical on every rank
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def _beta(self) -> Tensor:
        beta = whole(self.beta)  # a shard under FSDP2, outside forward
        if int(self.steps) < self.cold_start:
            # a zero gradient, not a missing one: DDP expects every parameter in the graph
            return beta.detach() + 0 * beta
        return beta

    def factors(self) -> Tensor:
        return torch.relu(torch.tanh(self.alpha ** 2 * (self.mu + self._beta())))

    def kept(self) -> Tensor:
        return self.factors().detach() > 0

    def penalty(self) -> Tensor:
        return self.weight * torch.clamp(self._beta(), min=-5.0).sum()

    def step(self) -> None:
        self.steps += 1

    def extra_repr(self) -> str:
        return f"units={self.units}, dim={self.dim}, weight={self.weight:g}, cold_start={self.cold_start}"


@dataclass
class DAM:
    """Insert a :class:`DAMMask` after each selected op, one per channel group (coupled layers
    share one mask). Needs shapes: pass example_inputs to compress().

    Fields: `select`/`exclude` pick the ops (see :mod:`surgery.select`); `lam` weighs the
    penalty, lam x mean over masks of clamp(beta, min=-5); `cold_start` is the number of
    ``surgery.step`` calls before beta starts to learn.
    """

    select: Selector = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    exclude: Selector = None
    attention: str = "heads"  # or "head_dims": what a unit of attention is (see ChannelPrune)
    normalised: bool = True  # False: no masks on channels a norm reads (see ChannelPrune; Shrink(into="modules"))
    lam: float = 0.1
    cold_start: int = 0
    # what it adds to the module tree (name globs, module classes): recipe.check_selections reads it
    inserts: ClassVar[tuple] = ("dam_*", DAMMask)
    # what the command line says when it refuses the pass: it does its work in the user's training loop
    trains: ClassVar[str] = "learns its masks in training (loss + surgery.penalty, surgery.step)"

    def __post_init__(self) -> None:
        check.selector("DAM", "select", self.select, empty_ok=False)
        check.selector("DAM", "exclude", self.exclude)
        check.choice("DAM", "attention", self.attention, ATTENTION_UNITS)
        check.flag("DAM", "normalised", self.normalised)
        check.number("DAM", "lam", self.lam, lo=0)
        check.number("DAM", "cold_start", self.cold_start, lo=0, integer=True)

    def apply(self, gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
        sites, skipped = unit_sites(gm, self.select, self.exclude, "dam", self.attention, self.normalised)
        ctx.notes.setdefault("dam", {})["unmasked"] = skipped
        for site in sites:
            insert_site(gm, site, DAMMask(site.units, site.dim, self.lam / len(sites), self.cold_start))
        return gm
