"""Identity: the simplest pass. Inserts an all-ones mask after each selected op; the model's
function is unchanged. It proves the plumbing and marks where masks would go."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn

from surgery.graph import insert_after
from surgery.pipeline import Context, UnitMask
from surgery.select import Selector, select_nodes

from . import _fields as check


class OnesMask(UnitMask):
    """A mask that keeps every unit with factor 1."""

    def factors(self) -> Tensor:
        return torch.ones(self.units)

    def forward(self, x: Tensor, dim: Optional[int] = None, tile: int = 1,
                runs: Optional[List[Tuple[int, int]]] = None, each: int = 1) -> Tensor:
        self.shape_for(x, dim, tile, runs, each)
        return x


@dataclass
class Identity:
    """Insert an :class:`OnesMask` after every selected module call (units on dim 1 for
    feature maps, the last dim otherwise). Needs shapes: pass example_inputs to compress."""

    select: Selector = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    exclude: Selector = None
    # what it adds to the module tree (name globs, module classes): recipe.check_selections reads it
    inserts: ClassVar[tuple] = ("mask_*", OnesMask)

    def __post_init__(self) -> None:
        check.selector("Identity", "select", self.select, empty_ok=False)
        check.selector("Identity", "exclude", self.exclude)

    def apply(self, gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
        from surgery.errors import SurgeryError
        for node in select_nodes(gm, self.select, self.exclude, skip=(UnitMask,)):
            shape = node.meta.get("shape")
            if not isinstance(shape, torch.Size):
                raise SurgeryError(f"Identity: node {node.name!r} ({node.target}) has no known tensor shape; "
                                   "pass example_inputs to compress()")
            module = gm.get_submodule(str(node.target))
            dim = -1 if isinstance(module, nn.Linear) or len(shape) < 3 else 1
            insert_after(gm, node, OnesMask(shape[dim], dim), f"mask_{node.target}")
        return gm
