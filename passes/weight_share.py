"""WeightShare: k-means weight sharing (Deep Compression's quantisation stage).

Each selected tensor's non-zero entries are clustered into at most 2^bits shared values
(zeros stay zero and take no codebook entry). Without fine-tuning the shared values are
written into the weights; with ``finetune=True`` each tensor becomes ``codebook[index]``
(a parametrization) whose codebook trains: the gradient of a centroid is the sum of the
gradients of its members. ``surgery.finalize(gm)`` bakes the codebooks in.

Example::

    >>> import torch, surgery
    >>> from passes import WeightShare
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> gm = surgery.compress(net, [WeightShare(bits=2)], example_inputs=torch.randn(2, 16))
    >>> len(torch.unique(gm.get_submodule("0").weight))
    4
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
from surgery.weights import INITS, WeightParametrization, cluster_tensor, finalize, share_tensor, weight_tensors

from . import _fields as check


class SharedWeight(WeightParametrization):
    """Parametrization ``cat([codebook, 0])[index]``: index len(codebook) marks a zero (pruned) entry.
    Only the codebook trains; the tensor it replaces is ignored until finalize bakes it."""

    def __init__(self, codebook: Tensor, index: Tensor, tensor: str):
        super().__init__()
        self.tensor = tensor
        self.codebook = nn.Parameter(codebook.clone())
        small = torch.int16 if len(codebook) < (1 << 15) - 1 else torch.int32
        self.register_buffer("index", index.to(small))

    def forward(self, w: Tensor) -> Tensor:
        table = torch.cat([self.codebook, self.codebook.new_zeros(1)]).to(w.dtype)
        return table[self.index.long()]

    def extra_repr(self) -> str:
        return f"tensor={self.tensor!r}, clusters={len(self.codebook)}"


@dataclass
class WeightShare:
    """Share each selected tensor's non-zero weights among 2^bits k-means centroids.

    `bits` is one width for all or ``{"classifier.*": 5, "features.*": 8}`` (names or globs
    over tensor names, first match wins, unmatched tensors untouched). `init` is "linear"
    (Han et al.), "density" or "kmeans++". Active pruning masks on a tensor are baked first.
    """

    bits: int | dict[str, int] = 4
    init: str = "linear"
    select: Selector = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    exclude: Selector = None
    finetune: bool = False
    param: str = "weight"
    seed: int = 0
    # what it adds to the module tree (name globs, module classes): recipe.check_selections reads it
    inserts: ClassVar[tuple] = ("*.parametrizations", "*.parametrizations.*",
                                parametrize.ParametrizationList, SharedWeight)

    def __post_init__(self) -> None:
        check.per_name("WeightShare", "bits", self.bits, _bits_field, "bits")
        check.choice("WeightShare", "init", self.init, INITS)
        check.selector("WeightShare", "select", self.select, empty_ok=False)
        check.selector("WeightShare", "exclude", self.exclude)
        check.flag("WeightShare", "finetune", self.finetune)
        check.identifier("WeightShare", "param", self.param, "a module tensor's name such as 'weight' or 'bias'")
        check.number("WeightShare", "seed", self.seed, lo=0, hi=check.SEED_MAX, integer=True)

    def apply(self, gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
        report = {}
        tensors = weight_tensors(gm, self.select, self.exclude, self.param)  # SelectionError when none selected
        if isinstance(self.bits, dict):  # a key that names no selected tensor would be ignored silently
            check.check_keys_used("WeightShare", "bits", self.bits, list(tensors))
        for name, (mod, attr) in tensors.items():
            bits = self._bits(name)
            if bits is None:
                continue
            if parametrize.is_parametrized(mod, attr):
                finalize(mod, inplace=True)  # bake an active pruning mask: its zeros must stay zero
                if parametrize.is_parametrized(mod, attr):
                    raise SurgeryError(f"WeightShare: {name} carries a parametrization surgery cannot bake")
            weight = getattr(mod, attr)
            if self.finetune:
                codebook, index = cluster_tensor(weight.detach().cpu(), bits, self.init, seed=self.seed)
                parametrize.register_parametrization(
                    mod, attr, SharedWeight(codebook.to(weight.device), index.to(weight.device), name))
                clusters = len(codebook)
            else:
                with torch.no_grad():
                    weight.copy_(share_tensor(weight.detach().cpu(), bits, self.init, seed=self.seed))
                clusters = None  # counting distinct values would cost a sort
            report[name] = {"bits": bits, "clusters": clusters}
        ctx.notes.setdefault("weight_share", {}).update(report)
        return gm

    def _bits(self, name: str) -> int | None:
        bits = check.lookup(self.bits, name) if isinstance(self.bits, dict) else self.bits
        return None if bits is None else int(bits)


def _bits_field(owner: str, field: str, value: object) -> None:
    # 2^bits centroids; the k-means and the int16/int32 index stop at 16 bits
    check.number(owner, field, value, lo=1, hi=16, integer=True)
