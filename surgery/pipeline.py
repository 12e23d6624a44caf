"""The pass pipeline: the Pass and Mask protocols, compress(), masks(), penalty(), step().

Example::

    >>> import torch, surgery
    >>> from passes import Identity
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = surgery.compress(net, passes=[Identity(select=torch.nn.Linear)], example_inputs=(torch.randn(2, 4),))
    >>> sorted(surgery.masks(gm))
    ['mask_0', 'mask_2']
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch
import torch.fx as fx
from torch import Tensor, nn

from .calling import as_inputs
from .capture import capture, surgery_meta
from .copying import copy_module, gc_paused
from .errors import SurgeryError
from .progress import stage
from .shapes import annotate_shapes

__all__ = ["Pass", "Mask", "UnitMask", "Context", "compress", "masks", "penalty", "step", "whole"]


def whole(t: Tensor) -> Tensor:
    """`t`, or the whole tensor where `t` is a shard: FSDP2 (``fully_shard``) keeps parameters as
    DTensor shards outside forward, where a mask's kept() and penalty() read them. Gathering is
    a collective: every rank must ask for the same masks in the same order (surgery.masks() and
    penalty() do). Differentiable. A scripted model holds no shards: `t` itself."""
    if torch.jit.is_scripting():
        return t
    return _gathered(t)


@torch.jit.unused
def _gathered(t: Tensor) -> Tensor:
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


@runtime_checkable
class Mask(Protocol):
    """What every mask module offers: the units that survive Shrink, a penalty to add to the
    loss, and a step of its schedule."""

    def kept(self) -> Tensor: ...

    def penalty(self) -> Tensor: ...

    def step(self) -> None: ...


@dataclass
class Context:
    """What a pass may need besides the graph: the example inputs (a tuple of positional
    inputs, a dict of keyword inputs, or None; run a model on them with
    :func:`surgery.calling.call`)."""

    example_inputs: tuple | dict[str, Any] | None = None
    notes: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Pass(Protocol):
    """A graph pass: a dataclass whose fields are its configuration.

    A pass may edit the graph without recompiling: compress recompiles after it, before the
    next pass that runs the module's code, and before returning.

    Optional class attributes (``ClassVar[bool]``) let :func:`compress` skip work:
    ``keeps_shapes = True`` says every node's ``meta["shape"]`` is right after the pass (no
    re-annotation run needed); ``needs_code = False`` says the pass never calls the GraphModule's
    generated code (it reads the graph, runs it through an interpreter such as
    :class:`ShapeProp`), so compress need not recompile before it. Leaving them out is always safe.
    """

    def apply(self, gm: fx.GraphModule, ctx: Context) -> fx.GraphModule: ...


def _shape_text(x: Tensor) -> str:
    """A shape as Python writes a tuple, ``(2, 4)``, in a form TorchScript compiles too (a masked
    model scripts: its masks' messages must)."""
    return "(" + ", ".join([str(s) for s in x.shape]) + ("," if x.dim() == 1 else "") + ")"


class UnitMask(nn.Module):
    """Base class for masks that scale the units along one axis of a tensor.

    A subclass provides ``factors()``: the per-unit multiplier the mask applies in eval mode
    (what Shrink folds or removes). ``kept()`` defaults to ``factors() != 0``. ``dim`` is the
    unit axis, counted from the end when negative, so one mask fits any batch shape. A call may
    name another axis, ``mask(x, dim=-1)``: one decision shared by tensors whose units lie on
    different axes (a convolution's NCHW output and a channels-last LayerNorm's, in ConvNeXt).
    A call may also cover some of the units only, ``mask(x, runs=((a, b), (c, d)))``: the axis
    holds units ``a .. b - 1`` and then ``c .. d - 1`` (a tensor that carries part of the
    decision's channels, as each layer's output does in a dense block whose concatenation one norm
    reads, or some of them twice); ``mask(x, each=k)``: each unit k times in a row.
    """

    def __init__(self, units: int, dim: int):
        super().__init__()
        if units <= 0:
            raise SurgeryError(f"{type(self).__name__}: a mask needs at least one unit, got {units}")
        self.units = int(units)
        self.dim = int(dim)
        self.kind = type(self).__name__  # for messages, in a form TorchScript reads

    def factors(self) -> Tensor:
        raise NotImplementedError

    def shape_for(self, x: Tensor, dim: Optional[int] = None, tile: int = 1,
                  runs: Optional[List[Tuple[int, int]]] = None, each: int = 1) -> list[int]:
        axis = self.dim if dim is None else dim
        dim = axis if axis >= 0 else x.dim() + axis
        n = x.shape[dim]
        if runs is not None:
            held = 0
            for a, b in runs:
                if a < 0 or b > self.units or a >= b:
                    raise SurgeryError(f"{self.kind}: units {a} to {b - 1} are not among its {self.units}")
                held += b - a
            if held != n:
                raise SurgeryError(f"{self.kind}: runs of {held} units on dim {axis}, got a tensor of "
                                   f"shape {_shape_text(x)}")
        elif n != self.units * tile * each:
            copies = f" {tile} times" if tile > 1 else f", each {each} times" if each > 1 else ""
            raise SurgeryError(f"{self.kind}: expected {self.units} units{copies} on dim {axis}, got a "
                               f"tensor of shape {_shape_text(x)}")
        shape = [1] * x.dim()
        shape[dim] = n
        return shape

    def unit_factors(self, x: Tensor, f: Tensor, dim: Optional[int] = None, tile: int = 1,
                     runs: Optional[List[Tuple[int, int]]] = None, each: int = 1) -> Tensor:
        """Per-unit factors `f` shaped to multiply `x` along the unit axis; with `tile`, the axis
        holds the units `tile` times over (Swin's patch merging joins four copies of each channel);
        with `runs`, those runs of them; with `each`, each unit `each` times in a row (a grouped
        convolution that makes several outputs of each input channel, PiT's pooling)."""
        shape = self.shape_for(x, dim, tile, runs, each)
        return self.spread(f.to(x.dtype), tile, runs, each).reshape(shape)

    def factors_at(self, length: int, tile: int = 1, runs: Optional[List[Tuple[int, int]]] = None,
                   each: int = 1) -> Tensor:
        """The factors a call applies along its axis of `length` positions (see ``forward``'s
        `tile`, `runs` and `each`), detached: what the channel analysis and Shrink read of one
        call. A `length` of the units alone gives them once (the analysis records one place
        per unit)."""
        f = self.factors().detach()
        if runs is None and len(f) == length:
            return f
        return self.spread(f, tile, runs, each)

    @staticmethod
    def spread(f: Tensor, tile: int = 1, runs: Optional[List[Tuple[int, int]]] = None, each: int = 1) -> Tensor:
        """Per-unit values `f` laid out as a call with `tile`, `runs` or `each` holds its units."""
        if runs is not None:
            return torch.cat([f[a:b] for a, b in runs])
        if each > 1:
            return f.repeat_interleave(each)
        return f.repeat(tile) if tile > 1 else f

    def forward(self, x: Tensor, dim: Optional[int] = None, tile: int = 1,
                runs: Optional[List[Tuple[int, int]]] = None, each: int = 1) -> Tensor:
        return x * self.unit_factors(x, self.factors(), dim, tile, runs, each)

    def kept(self) -> Tensor:
        return self.factors().detach() != 0

    def penalty(self) -> Tensor:
        p = next(self.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)

    def step(self) -> None:
        pass

    def extra_repr(self) -> str:
        return f"units={self.units}, dim={self.dim}"


def masks(gm: nn.Module) -> dict[str, Mask]:
    """Every mask module in `gm` by qualified name (anything with kept/penalty/step)."""
    return {n: m for n, m in gm.named_modules() if n and isinstance(m, Mask) and not isinstance(m, type)}


def penalty(gm: nn.Module) -> Tensor:
    """The sum of every mask's penalty (a zero tensor when there are none)."""
    terms = [m.penalty() for m in masks(gm).values()]
    if not terms:
        p = next(gm.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack([t.reshape(()) for t in terms]).sum()


def step(gm: nn.Module) -> None:
    """Advance every mask's schedule by one step (call once per optimizer step)."""
    for m in masks(gm).values():
        m.step()


@gc_paused()
def compress(model: nn.Module, passes: Sequence[Pass], example_inputs: Any = None, *,
             inplace: bool = False, leaf_modules: Sequence = (), concrete_args: dict | None = None,
             ) -> fx.GraphModule:
    """Capture `model` (a copy of it) and run `passes` over the graph, in order.

    `model` may be any nn.Module or a GraphModule from an earlier compress(); it is never
    mutated unless ``inplace=True`` (GraphModules only). `example_inputs` are positional (a
    tuple or one tensor) or keyword (a dict; see :func:`surgery.capture`). With them, node shapes are
    (re)annotated before the passes run and after each pass that does not declare
    ``keeps_shapes = True``.

    The working copy is copy-on-write (:func:`surgery.copying.copy_module`): it shares the caller's
    weights until a pass writes into one, so compressing a large model does not hold its weights
    twice, and the result never aliases the caller's model.
    """
    inputs = as_inputs(example_inputs, model)
    for p in passes:
        if not callable(getattr(p, "apply", None)):
            raise SurgeryError(f"{p!r} is not a pass: it has no apply(gm, ctx) method")
    if isinstance(model, fx.GraphModule):
        gm = model if inplace else copy_module(model)
        if inputs is not None:
            annotate_shapes(gm, inputs)
    elif isinstance(model, nn.Module):
        if inplace:
            raise SurgeryError("inplace=True needs a GraphModule; an nn.Module is always captured as a copy")
        with stage(f"capture {type(model).__name__}"):
            gm = capture(model, inputs, leaf_modules=leaf_modules, concrete_args=concrete_args, _code=False)
    else:
        raise SurgeryError(f"compress expects an nn.Module, got {type(model).__name__}")
    ctx = Context(example_inputs=inputs)
    stale = not isinstance(model, fx.GraphModule)  # the code is older than the graph (capture left it out)
    for p in passes:
        if stale and getattr(p, "needs_code", True):
            gm.recompile()
        code_before = gm._code
        with stage(type(p).__name__):
            out = p.apply(gm, ctx)
        if not isinstance(out, fx.GraphModule):
            if isinstance(out, nn.Module) and p is passes[-1]:  # the model in its own classes: Shrink(into="modules")
                return out
            raise SurgeryError(f"{type(p).__name__}.apply returned {type(out).__name__}, not a GraphModule"
                               + (" (a pass returning the model in its own classes must be the last)"
                                  if isinstance(out, nn.Module) else ""))
        gm = out
        stale = gm._code is code_before  # the pass left recompiling to us (one that recompiled is current)
        if stale:
            gm.graph.lint()  # a pass that recompiled has had its graph checked by codegen (graph.finish lints)
        surgery_meta(gm)["passes"].append(repr(p))
        if inputs is not None and not getattr(p, "keeps_shapes", False):
            annotate_shapes(gm, inputs)  # interprets the graph: fresh code not needed
    if stale:
        gm.recompile()
    return gm
