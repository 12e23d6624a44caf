"""Hardening and measuring activation sparsifiers, by protocol: a module that sparsifies
activations has a ``harden()`` method (surgery never imports a concrete pass).

Example::

    >>> import torch, surgery
    >>> from passes import Sparsifier
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
    >>> x = torch.randn(16, 4)
    >>> gm = surgery.compress(net, [Sparsifier(select="0", eps=0.3)], (x,))
    >>> hard = surgery.harden(gm)          # a hardened copy; gm is unchanged
    >>> sorted(surgery.activation_sparsity(hard, x))
    ['sparsify_0']
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..calling import call
from ..copying import copy_module
from ..errors import SurgeryError
from ..verify import eval_mode

__all__ = ["harden", "activation_sparsity", "sparsifiers"]


def sparsifiers(gm: nn.Module) -> dict[str, nn.Module]:
    """Every module of `gm` with a ``harden()`` method, by qualified name."""
    return {n: m for n, m in gm.named_modules() if n and callable(getattr(m, "harden", None))}


def harden(gm: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Swap every soft sparsifier for its exact hard threshold. Returns a hardened copy
    (`gm` itself with ``inplace=True``)."""
    out = gm if inplace else copy_module(gm)
    for m in sparsifiers(out).values():
        m.harden()
    return out


@torch.no_grad()
def activation_sparsity(gm: nn.Module, inputs: Any, *, total: bool = False) -> dict[str, float] | float:
    """Fraction of exact zeros in the output of every sparsifier of `gm`, run in eval mode
    on `inputs` (a tensor, a tuple of positional inputs or a dict of keyword inputs). With ``total=True``: one figure,
    zeros over elements across all those tensors."""
    mods = sparsifiers(gm)
    if not mods:
        raise SurgeryError(f"{type(gm).__name__} has no activation sparsifier (a module with harden())")
    counts: dict[str, list[int]] = {n: [0, 0] for n in mods}
    hooks = []
    for name, m in mods.items():
        def hook(_m, _inp, out, name=name):
            counts[name][0] += int((out == 0).sum())
            counts[name][1] += out.numel()
        hooks.append(m.register_forward_hook(hook))
    try:
        with eval_mode(gm):
            call(gm, inputs)
    finally:
        for h in hooks:
            h.remove()
    if total:
        elems = sum(c[1] for c in counts.values())
        return sum(c[0] for c in counts.values()) / max(elems, 1)
    return {n: c[0] / max(c[1], 1) for n, c in counts.items()}
