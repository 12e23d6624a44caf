"""Weight tensors and their parametrizations: which tensors a weight pass selects, magnitude
masks, the parametrization base class and ``finalize()``.

One implementation of each: ``passes.MagnitudePrune`` and ``passes.WeightShare`` import these,
and so do ``surgery.sensitivity`` / ``surgery.bits_analysis``. K-means weight sharing is in
:mod:`surgery.weights.kmeans`.

Example::

    >>> import torch
    >>> from surgery.weights import magnitude_mask
    >>> w = torch.tensor([0.1, -2.0, 0.3, 4.0])
    >>> magnitude_mask(w, 0.5).tolist()
    [False, True, False, True]
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..copying import copy_module
from ..errors import SurgeryError
from ..select import Selector, select_modules

__all__ = ["WeightParametrization", "weight_tensors", "magnitude_mask", "finalize"]

class WeightParametrization(nn.Module):
    """Base class of surgery's weight parametrizations (a pruning mask, a shared-weight codebook).

    ``finalize()`` recognises them by this class, bakes the value they compute into an ordinary
    parameter and removes them; parametrizations of other origins (weight_norm, orthogonal) are
    left alone.
    """

    tensor: str = ""  # qualified name of the tensor it parametrizes, for messages


def weight_tensors(model: nn.Module, select: Selector = None, exclude: Selector = None,
                   param: str = "weight") -> dict[str, tuple[nn.Module, str]]:
    """The ``param`` tensors of the selected modules: ``{"features.0.weight": (module, "weight")}``.

    Modules without a tensor of that name are skipped; SelectionError when none is left.
    """
    out: dict[str, tuple[nn.Module, str]] = {}
    for name, mod in select_modules(model, select, exclude).items():
        if "." in param or not isinstance(getattr(mod, param, None), Tensor):
            continue
        if parametrize.is_parametrized(mod) and name.split(".")[-1] == "parametrizations":
            continue
        out[f"{name}.{param}"] = (mod, param)
    if not out:
        raise SurgeryError(f"no selected module has a tensor named {param!r}")
    return out


def magnitude_mask(w: Tensor, sparsity: float, keep: Tensor | None = None) -> Tensor:
    """The boolean mask (True = kept) that zeroes exactly ``round(sparsity * numel)`` entries of
    `w`, the smallest in magnitude. Entries already dropped by `keep` are dropped first, so masks
    from a rising sparsity are nested. Ties are broken by position, so the count is exact."""
    if not 0.0 <= float(sparsity) <= 1.0:
        raise SurgeryError(f"sparsity must lie in [0, 1], got {sparsity}")
    n = w.numel()
    k = int(round(float(sparsity) * n))
    if k == 0:
        return torch.ones_like(w, dtype=torch.bool)
    if k >= n:
        return torch.zeros_like(w, dtype=torch.bool)
    score = w.detach().abs().float().reshape(-1)
    if keep is not None:
        score = torch.where(keep.reshape(-1), score, score.new_full((), -1.0))
    thr = torch.kthvalue(score, k).values
    drop = score < thr
    need = k - int(drop.sum())
    if need > 0:  # ties at the threshold: drop the first `need` of them
        ties = torch.nonzero(score == thr).reshape(-1)[:need]
        drop[ties] = True
    return (~drop).reshape(w.shape)


# ---------------------------------------------------------------- finalize
def finalize(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Bake every surgery weight parametrization (pruning masks, shared-weight codebooks) into
    ordinary parameters and remove it, so the model is a plain model again (a plain
    GraphModule stays a GraphModule; it pickles and scripts). Other parametrizations stay.

    Returns a copy unless ``inplace=True``.
    """
    out = model if inplace else copy_module(model)
    for name, mod in list(out.named_modules()):
        if not parametrize.is_parametrized(mod):
            continue
        for tensor in list(mod.parametrizations.keys()):
            plist = mod.parametrizations[tensor]
            ours = [isinstance(p, WeightParametrization) for p in plist]
            if not any(ours):
                continue
            if not all(ours):
                raise SurgeryError(f"finalize: {name}.{tensor} mixes surgery and other parametrizations "
                                   f"({', '.join(type(p).__name__ for p in plist)}); remove the others first")
            _own_class(mod)
            with torch.no_grad():
                parametrize.remove_parametrizations(mod, tensor, leave_parametrized=True)
    return out


def _own_class(mod: nn.Module) -> None:
    """Give a parametrized module a class of its own. torch's parametrize keeps the generated
    class when a module is deep-copied, and removing a parametrization deletes its property from
    that class, which would break every other copy (the caller's model among them)."""
    cls = type(mod)
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    mod.__class__ = type(cls.__name__, cls.__bases__, body)
