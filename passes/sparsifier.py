"""Sparsifier: a learnable (lossy) soft threshold that drives activations to exact zeros.

Training uses the smooth threshold ``y = sigmoid(a (x - |eps|)) x + sigmoid(a (-|eps| - x)) x``
with a learnable `eps` and a sharpness `a` that ``step()`` doubles on a schedule; a penalty on
``y`` (a smooth L0, L1 or L2) pushes values under the threshold. Hardening swaps in the exact
``|x| <= |eps| -> 0``, which is what the exported model runs.

Example::

    >>> import torch, surgery
    >>> from torch import nn
    >>> from passes import Sparsifier
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> x = torch.randn(32, 8)
    >>> gm = surgery.compress(net, [Sparsifier(select="0", eps=0.5, hard=True)], (x,))
    >>> frac = surgery.activation_sparsity(gm, x)["sparsify_0"]
    >>> 0.5 <= frac <= 1.0
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
from torch import Tensor, nn

from surgery.channels import passthrough, register_rule
from surgery.errors import SurgeryError
from surgery.pipeline import Context
from surgery.select import Selector

from . import _fields as check
from ._placement import insert_site, tensor_sites

__all__ = ["Sparsifier", "SparsifierModule", "PENALTIES"]

PENALTIES = ("l0", "l1", "l2")


class SparsifierModule(nn.Module):
    """The threshold on one activation tensor (a per-tensor learnable `eps`).

    Follows the mask protocol: ``penalty()`` (on the output of the last training forward),
    ``step()`` (doubles `a` every `double_every` steps, up to `a_max`), ``kept()`` (one True:
    a sparsifier removes no unit, Shrink leaves it alone) and ``harden()``.
    """

    def __init__(self, eps: float = 0.1, a: float = 1.0, penalty: str = "l0", weight: float = 1e-3,
                 normalize: bool = True, b: float = 1e-2, double_every: int = 0, a_max: float = math.inf,
                 hard: bool = False):
        super().__init__()
        if penalty not in PENALTIES:
            raise SurgeryError(f"Sparsifier: penalty must be one of {PENALTIES}, got {penalty!r}")
        self.eps = nn.Parameter(torch.tensor(float(eps)))
        self.register_buffer("a", torch.tensor(float(a)))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.kind = penalty
        self.weight = float(weight)
        self.normalize = bool(normalize)
        self.b = float(b)
        self.double_every = int(double_every)
        self.a_max = float(a_max)
        self.hard = bool(hard)
        self._last = None

    def forward(self, x: Tensor) -> Tensor:
        e = self.eps.abs().to(x.dtype)
        if self.hard:
            # out of place: the reference wrote x[|x| <= eps] = 0, which corrupts autograd
            # (x is saved by the op that produced it) and the caller's tensor
            return x.masked_fill(x.abs() <= e, 0.0)
        a = self.a.to(x.dtype)
        y = torch.sigmoid(a * (x - e)) * x + torch.sigmoid(a * (-e - x)) * x
        if self.training and not torch.jit.is_scripting():
            self._last = y
        return y

    def __getstate__(self):
        # the last activation belongs to one training step: never copy or pickle it (a
        # non-leaf tensor cannot be deep-copied, and compress() copies its input)
        state = self.__dict__.copy()
        state["_last"] = None
        return state

    def penalty(self) -> Tensor:
        y = self._last
        if y is None or not self.training or self.hard:
            return self.eps.new_zeros(())
        if self.kind == "l0":
            t = y * y / (y * y + self.b)
        elif self.kind == "l1":
            t = y.abs()
        else:
            t = y * y
        return self.weight * (t.mean() if self.normalize else t.sum())

    def step(self) -> None:
        self.steps += 1
        if self.double_every > 0 and int(self.steps) % self.double_every == 0:
            self.a.copy_(torch.clamp(self.a * 2, max=self.a_max))

    def kept(self) -> Tensor:
        return torch.ones(1, dtype=torch.bool, device=self.eps.device)

    def harden(self) -> None:
        """Switch to the exact threshold ``|x| <= |eps| -> 0`` (what is exported)."""
        self.hard = True
        self._last = None

    def extra_repr(self) -> str:
        return (f"eps={float(self.eps.detach().abs()):.4g}, a={float(self.a):g}, penalty={self.kind}, "
                f"weight={self.weight:g}, hard={self.hard}")


@dataclass
class Sparsifier:
    """Insert a :class:`SparsifierModule` on the output of each selected op (after its
    BatchNorm/activation).

    Fields: `eps` initial threshold; `a` initial sharpness, doubled every `double_every`
    ``surgery.step`` calls (0: never) up to `a_max`; `penalty` "l0" (``y^2 / (y^2 + b)``), "l1"
    or "l2", weighted by `weight`, averaged over the tensor when `normalize` (else summed);
    `hard=True` inserts the exact threshold right away (or call ``surgery.harden(gm)`` later).
    """

    select: Selector = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    exclude: Selector = None
    eps: float = 0.1
    a: float = 1.0
    penalty: str = "l0"
    weight: float = 1e-3
    normalize: bool = True
    b: float = 1e-2
    double_every: int = 0
    a_max: float = math.inf
    hard: bool = False
    # what it adds to the module tree (name globs, module classes): recipe.check_selections reads it
    inserts: ClassVar[tuple] = ("sparsify_*", SparsifierModule)
    trains: ClassVar[str] = "learns its thresholds in training (loss + surgery.penalty, surgery.step)"

    def __post_init__(self) -> None:
        check.selector("Sparsifier", "select", self.select, empty_ok=False)
        check.selector("Sparsifier", "exclude", self.exclude)
        check.number("Sparsifier", "eps", self.eps, lo=0, hi=check.FLOAT32_MAX, why="stored as float32")
        check.number("Sparsifier", "a", self.a, lo=0, lo_open=True, hi=check.FLOAT32_MAX, why="stored as float32")
        check.choice("Sparsifier", "penalty", self.penalty, PENALTIES)
        check.number("Sparsifier", "weight", self.weight, lo=0)
        check.flag("Sparsifier", "normalize", self.normalize)
        check.number("Sparsifier", "b", self.b, lo=0, lo_open=True, why="the l0 penalty divides by y^2 + b")
        check.number("Sparsifier", "double_every", self.double_every, lo=0, integer=True)
        check.number("Sparsifier", "a_max", self.a_max, lo=self.a, finite=False, why="a_max caps the sharpness a")
        check.flag("Sparsifier", "hard", self.hard)

    def apply(self, gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
        for site in tensor_sites(gm, self.select, self.exclude, "sparsify", skip=(SparsifierModule,)):
            insert_site(gm, site, SparsifierModule(self.eps, self.a, self.penalty, self.weight, self.normalize,
                                                   self.b, self.double_every, self.a_max, self.hard))
        return gm


# element-wise and 0 -> 0: channels pass through unchanged, so Shrink can still remove
# channels that a mask zeroes on either side of a sparsifier
register_rule(SparsifierModule, passthrough())
