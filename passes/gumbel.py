"""GumbelMask: per-unit binary gates learned with the Gumbel-sigmoid (binary concrete) trick.

Training samples logistic noise and uses a straight-through hard gate: the forward multiplies
by ``y > 0.5`` while the gradient is the soft ``sigmoid((logit + noise) / tau)``'s. Eval mode is
deterministic (unit on where ``logit >= 0``). With ``freeze_weights=True`` only the gates (and
the modules named in `trainable`, e.g. a new head) learn: subnetwork discovery inside a frozen
pretrained model.

Example::

    >>> import torch, surgery
    >>> from torch import nn
    >>> from passes import GumbelMask
    >>> net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
    >>> gm = surgery.compress(net, [GumbelMask(select="0", freeze_weights=True, trainable="2")],
    ...                       (torch.randn(2, 64),))
    >>> sorted(n for n, p in gm.named_parameters() if p.requires_grad)
    ['2.bias', '2.weight', 'gumbel_0.logits']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn

from surgery.channels import ATTENTION_UNITS
from surgery.errors import ConfigError, SelectionError, SurgeryError
from surgery.pipeline import Context, UnitMask, masks, whole
from surgery.select import Selector, describe, select_modules

from . import _fields as check
from ._placement import insert_site, unit_sites

__all__ = ["GumbelMask", "GumbelGate"]


class GumbelGate(UnitMask):
    """A hard 0/1 gate per unit with learnable logits (initially `init`).

    ``penalty() = weight x sum(logits)`` pushes gates closed; ``kept()`` is the eval decision
    (``logit >= 0``; the issue's ``logit > 0`` differs only at exactly 0, where we keep the
    unit so that kept() always agrees with what the eval forward computes).
    """

    def __init__(self, units: int, dim: int, weight: float = 1e-4, tau: float = 1.0, init: float = 2.0):
        super().__init__(units, dim)
        if tau <= 0:
            raise SurgeryError(f"GumbelGate: tau must be > 0, got {tau}")
        self.logits = nn.Parameter(torch.full((units,), float(init)))
        self.weight = float(weight)
        self.tau = float(tau)

    def factors(self) -> Tensor:
        logits = whole(self.logits).detach()  # a shard under FSDP2, outside forward
        return (logits >= 0).to(logits.dtype)

    def gate(self) -> Tensor:
        """One sample of the straight-through gate (training) or the eval decision."""
        if not self.training:
            return self.factors()
        u = torch.rand_like(self.logits).clamp_(1e-6, 1 - 1e-6)
        noise = torch.log(u) - torch.log1p(-u)
        soft = torch.sigmoid((self.logits + noise) / self.tau)
        hard = (soft > 0.5).to(soft.dtype)
        return hard + (soft - soft.detach())  # exactly `hard` forward, the soft gradient backward

    def forward(self, x: Tensor, dim: Optional[int] = None, tile: int = 1,
                runs: Optional[List[Tuple[int, int]]] = None, each: int = 1) -> Tensor:
        return x * self.unit_factors(x, self.gate(), dim, tile, runs, each)

    def penalty(self) -> Tensor:
        return self.weight * whole(self.logits).sum()

    def extra_repr(self) -> str:
        return f"units={self.units}, dim={self.dim}, weight={self.weight:g}, tau={self.tau:g}"


@dataclass
class GumbelMask:
    """Insert a :class:`GumbelGate` after each selected op, one per channel group.

    Fields: `alpha` weighs the penalty (alpha x sum of logits, per gate); `tau` is the
    temperature; `init` the initial logit (2.0: every unit starts on with high probability);
    `freeze_weights` freezes every parameter except the gates' and those of the modules
    `trainable` selects (same selector forms as `select`).
    """

    select: Selector = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    exclude: Selector = None
    attention: str = "heads"  # or "head_dims": what a unit of attention is (see ChannelPrune)
    normalised: bool = True  # False: no masks on channels a norm reads (see ChannelPrune; Shrink(into="modules"))
    alpha: float = 1e-4
    tau: float = 1.0
    init: float = 2.0
    freeze_weights: bool = False
    trainable: Selector = None
    # what it adds to the module tree (name globs, module classes): recipe.check_selections reads it
    inserts: ClassVar[tuple] = ("gumbel_*", GumbelGate)
    trains: ClassVar[str] = "learns its gates in training (loss + surgery.penalty)"

    def __post_init__(self) -> None:
        check.selector("GumbelMask", "select", self.select, empty_ok=False)
        check.selector("GumbelMask", "exclude", self.exclude)
        check.choice("GumbelMask", "attention", self.attention, ATTENTION_UNITS)
        check.flag("GumbelMask", "normalised", self.normalised)
        check.number("GumbelMask", "alpha", self.alpha, lo=0)
        check.number("GumbelMask", "tau", self.tau, lo=0, lo_open=True)
        check.number("GumbelMask", "init", self.init, lo=-check.FLOAT32_MAX, hi=check.FLOAT32_MAX,
                     why="the logits are float32")
        check.flag("GumbelMask", "freeze_weights", self.freeze_weights)
        # empty_ok=False: select_modules reads trainable=() as every module, which unfreezes all
        check.selector("GumbelMask", "trainable", self.trainable, empty_ok=False)
        if self.trainable is not None and not self.freeze_weights:
            raise ConfigError("GumbelMask", "trainable", self.trainable,
                              "only means something with freeze_weights=True (everything trains otherwise)")

    def apply(self, gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
        sites, skipped = unit_sites(gm, self.select, self.exclude, "gumbel", self.attention, self.normalised)
        ctx.notes.setdefault("gumbel", {})["unmasked"] = skipped
        for site in sites:
            insert_site(gm, site, GumbelGate(site.units, site.dim, self.alpha, self.tau, self.init))
        if self.freeze_weights:
            self._freeze(gm)
        return gm

    def _freeze(self, gm: fx.GraphModule) -> None:
        keep = set()
        owners = dict(masks(gm))
        if self.trainable is not None:
            try:
                owners.update(select_modules(gm, self.trainable))
            except SelectionError as e:  # select.py speaks of select=; this selector is trainable=
                raise SelectionError(f"GumbelMask: trainable={describe(self.trainable)} matched no module of the graph",
                                     e.nearest) from None
        for name, module in owners.items():
            keep.update(id(p) for p in module.parameters())
        for p in gm.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
