"""Shrink as a pass: ``compress(gm, [Shrink()], example_inputs=(x,))``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from surgery.pipeline import Context
from surgery.shrink import shrink
from surgery.shrink.modules import INTO

from . import _fields as check

__all__ = ["Shrink"]


@dataclass
class Shrink:
    """Remove every channel the masks zero, fold kept mask values, verify against the masked
    model (raising ShrinkMismatch beyond `tol`, relative to the output's scale). The result
    carries a :class:`surgery.shrink.ShrinkReport` as ``.report`` (and in
    ``gm.meta["surgery"]["shrink_report"]``).

    ``into="graph"`` (the default) returns a standalone GraphModule, for deployment and export.
    ``into="modules"`` returns the model in its own classes, with its qualified names and size
    attributes (``model.encoder.layer[3]``, ``generate()``, ``save_pretrained``), verified the
    same way; it raises, naming the module, where the model's forward hard-codes a size the
    pruning changes. It must be the last pass."""

    tol: float = 1e-4
    into: str = "graph"
    keeps_shapes: ClassVar[bool] = True     # its verification run annotates the shrunk graph
    needs_code: ClassVar[bool] = False      # runs the masked graph through ShapeProp, recompiles at the end
    # what it adds to the module tree (name globs, module classes): recipe.check_selections reads it
    inserts: ClassVar[tuple] = ()

    def __post_init__(self) -> None:
        check.number("Shrink", "tol", self.tol, lo=0)
        check.choice("Shrink", "into", self.into, INTO)

    def apply(self, gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
        out = shrink(gm, ctx.example_inputs, self.tol, inplace=True, into=self.into)  # compress() hands us a copy
        if isinstance(out, fx.GraphModule):
            out.report = out.meta["surgery"]["shrink_report"]
        return out
