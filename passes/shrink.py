"""Shrink as a pass: ``compress(gm, [Shrink()], example_inputs=(x,))``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from surgery.pipeline import Context
from surgery.shrink import shrink

from . import _fields as check

__all__ = ["Shrink"]


@dataclass
class Shrink:
    """Remove every channel the masks zero, fold kept mask values, verify against the masked
    model (raising ShrinkMismatch beyond `tol`, relative to the output's scale). The result
    carries a :class:`surgery.shrink.ShrinkReport` as ``.report`` (and in
    ``gm.meta["surgery"]["shrink_report"]``)."""

    tol: float = 1e-4
    keeps_shapes: ClassVar[bool] = True     # its verification run annotates the shrunk graph
    needs_code: ClassVar[bool] = False      # runs the masked graph through ShapeProp, recompiles at the end
    # what it adds to the module tree (name globs, module classes): recipe.check_selections reads it
    inserts: ClassVar[tuple] = ()

    def __post_init__(self) -> None:
        check.number("Shrink", "tol", self.tol, lo=0)

    def apply(self, gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
        out = shrink(gm, ctx.example_inputs, self.tol, inplace=True)  # compress() hands us its own copy
        out.report = out.meta["surgery"]["shrink_report"]
        return out
