"""MagnitudePrune: unstructured magnitude pruning per tensor, one-shot or on an AGP schedule.

Example::

    >>> import torch, surgery
    >>> from passes import MagnitudePrune, AGP
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> gm = surgery.compress(net, [MagnitudePrune(0.9, schedule=AGP(0, 10))], example_inputs=torch.randn(2, 16))
    >>> for _ in range(10):
    ...     surgery.step(gm)          # after each optimizer step
    >>> plain = surgery.finalize(gm)  # zeros baked, masks gone
    >>> round(float((plain.get_submodule("0").weight == 0).float().mean()), 2)
    0.9

Why a parametrization (``torch.nn.utils.parametrize``) rather than zeroing the weights after
each optimizer step: the weight the module uses is recomputed as ``where(mask, original, 0)``
on every forward, so pruned entries are exactly zero whatever the optimizer does (momentum,
Adam, weight decay), their gradients are zero, no optimizer hook is needed, the graph is not
edited and ``module.weight`` keeps its name. The price: a parametrized model pickles only
through its state_dict and does not script, which is what ``surgery.finalize`` is for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils import parametrize

from surgery.errors import SurgeryError
from surgery.pipeline import Context
from surgery.select import Selector
from surgery.weights import WeightParametrization, magnitude_mask, weight_tensors

from . import _fields as check


@dataclass
class AGP:
    """Automated gradual pruning (Zhu & Gupta 2017): sparsity rises from `initial` at
    `start_step` to the target at `end_step` along a cubic curve, updated every `every` steps:
    ``s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))**3``. Monotone; exactly the target
    from `end_step` on."""

    start_step: int = 0
    end_step: int = 1000
    every: int = 1
    initial: float = 0.0

    def __post_init__(self) -> None:
        check.number("AGP", "start_step", self.start_step, lo=0, integer=True)
        check.number("AGP", "end_step", self.end_step, lo=self.start_step, lo_open=True, integer=True,
                     why="AGP needs 0 <= start_step < end_step")
        check.number("AGP", "every", self.every, lo=1, integer=True)
        check.number("AGP", "initial", self.initial, lo=0, hi=1, hi_open=True, why="the initial sparsity")

    def sparsity_at(self, step: int, final: float) -> float:
        """The sparsity at optimizer step `step` for a final target `final`."""
        if step < self.start_step:
            return min(self.initial, final)
        if step >= self.end_step:
            return final
        t = self.start_step + (step - self.start_step) // self.every * self.every
        frac = (t - self.start_step) / (self.end_step - self.start_step)
        return final + (min(self.initial, final) - final) * (1.0 - frac) ** 3


class WeightMask(WeightParametrization):
    """Parametrization ``where(mask, weight, 0)`` with a magnitude mask that follows a schedule.

    Implements the Mask protocol: ``kept()`` is the element mask (True = kept; it is not a
    unit mask, Shrink has nothing to remove), ``penalty()`` is zero, ``step()`` advances the
    schedule and re-prunes by magnitude; masks only grow sparser (pruned entries stay pruned).
    """

    def __init__(self, shape: torch.Size, target: float, schedule: AGP | None, tensor: str,
                 device: torch.device | None = None):
        super().__init__()
        self.target = float(target)
        self.schedule = schedule
        self.tensor = tensor
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool, device=device))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long, device=device))

    def forward(self, w: Tensor) -> Tensor:
        return torch.where(self.mask, w, w.new_zeros(()))

    def current_target(self) -> float:
        if self.schedule is None:
            return self.target
        return self.schedule.sparsity_at(int(self.steps), self.target)

    def sparsity(self) -> float:
        """The fraction of entries pruned now."""
        return 1.0 - float(self.mask.float().mean())

    @torch.no_grad()
    def update(self, original: Tensor) -> None:
        """Re-prune `original` (the unmasked tensor) to the current target, nested in the mask."""
        self.mask.copy_(magnitude_mask(original, self.current_target(), keep=self.mask))

    def kept(self) -> Tensor:
        return self.mask

    def penalty(self) -> Tensor:
        return torch.zeros((), device=self.mask.device)

    def step(self) -> None:
        if self.schedule is None:
            return
        before = self.current_target()
        self.steps += 1
        if self.current_target() != before:
            source = self.__dict__.get("_source")
            if source is None:
                raise SurgeryError(f"WeightMask of {self.tensor}: lost its tensor; it was not attached by MagnitudePrune")
            self.update(source)

    def extra_repr(self) -> str:
        return f"tensor={self.tensor!r}, target={self.target}, sparsity={self.sparsity():.4f}, schedule={self.schedule}"


def _fraction(owner: str, field: str, value: object) -> None:
    check.number(owner, field, value, lo=0, hi=1)


@dataclass
class MagnitudePrune:
    """Zero the smallest-magnitude entries of each selected tensor.

    `sparsity` is one fraction for every tensor or ``{"features.0.weight": 0.35, "classifier.*": 0.9}``
    (names or globs over tensor names; first match wins; unmatched tensors are left dense).
    With `schedule` (an :class:`AGP`) the sparsity rises on each ``surgery.step(gm)``; without,
    the target applies at once. ``surgery.finalize(gm)`` bakes the zeros in.
    """

    sparsity: float | dict[str, float] = 0.8
    select: Selector = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    exclude: Selector = None
    schedule: AGP | None = None
    param: str = "weight"
    # what it adds to the module tree (name globs, module classes): recipe.check_selections reads it
    inserts: ClassVar[tuple] = ("*.parametrizations", "*.parametrizations.*",
                                parametrize.ParametrizationList, WeightMask)

    def __post_init__(self) -> None:
        check.per_name("MagnitudePrune", "sparsity", self.sparsity, _fraction, "sparsity")
        check.selector("MagnitudePrune", "select", self.select, empty_ok=False)
        check.selector("MagnitudePrune", "exclude", self.exclude)
        check.instance("MagnitudePrune", "schedule", self.schedule, AGP)
        check.identifier("MagnitudePrune", "param", self.param, "a module tensor's name such as 'weight' or 'bias'")

    @property
    def trains(self) -> str | None:
        """Why the command line refuses the pass (its schedule advances with training steps), or None."""
        return None if self.schedule is None else "reaches its sparsity over training steps (surgery.step)"

    def targets(self, model: nn.Module) -> dict[str, tuple[nn.Module, str, float]]:
        """tensor name -> (module, attribute, target sparsity) for the tensors this pass prunes."""
        out = {}
        for name, (mod, attr) in weight_tensors(model, self.select, self.exclude, self.param).items():
            s = check.lookup(self.sparsity, name) if isinstance(self.sparsity, dict) else self.sparsity
            if s is None:
                continue
            out[name] = (mod, attr, float(s))
        if isinstance(self.sparsity, dict):
            check.check_keys_used("MagnitudePrune", "sparsity", self.sparsity, list(out))
        return out

    def apply(self, gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
        done = {}
        for name, (mod, attr, s) in self.targets(gm).items():
            if parametrize.is_parametrized(mod, attr):
                raise SurgeryError(f"MagnitudePrune: {name} is already parametrized "
                                   f"({type(mod.parametrizations[attr][0]).__name__}); surgery.finalize(gm) first")
            weight = getattr(mod, attr)
            mask = WeightMask(weight.shape, s, self.schedule, name, weight.device)
            parametrize.register_parametrization(mod, attr, mask)
            source = mod.parametrizations[attr].original
            # a plain reference (not a registered submodule/parameter): deepcopy maps it through
            # its memo to the copied parameter, so copies stay wired to their own tensor
            mask.__dict__["_source"] = source
            mask.update(source)
            done[name] = s
        ctx.notes.setdefault("magnitude", {}).update(done)
        return gm
