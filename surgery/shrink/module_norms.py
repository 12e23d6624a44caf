"""Norms of a pruned stream in the model's own classes (``Shrink(into="modules")``).

The graph form keeps a norm exact after its stream lost channels by dividing by the original
width N (:mod:`surgery.norms`). A class's forward divides by the width it sees, K. For an RMSNorm
that is one rescaling away: over the K kept channels (the others being zero),

    w * x / sqrt(sum(x^2) / N + eps) = (w * sqrt(N/K)) * x / sqrt(sum(x^2) / K + eps * N/K)

so the module takes ``eps * N/K`` and a weight scaled by ``sqrt(N/K)`` (``(1 + w) * sqrt(N/K) - 1``
for Gemma's ``1 + w`` form). Which form a module has is found by running it alone on a random
input against the formula above, before and after. A LayerNorm subtracts a mean over N that no
K-wide LayerNorm reproduces: it is refused, naming the module, with the remedy
(``ChannelPrune(normalised=False)``); so is a standardised convolution that lost inputs (timm's
StdConv2d: its filters' statistics over the original weights).
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import SurgeryError
from ..libraries import STANDARDISED_CONVS, standardised_conv

__all__ = ["norm_sites", "rescale_norms", "module_path"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
_NORM_FUNCTIONS = (F.layer_norm, F.group_norm, *((F.rms_norm,) if hasattr(F, "rms_norm") else ()))
_SUGGEST = ("prune with ChannelPrune(normalised=False), which leaves the channels a norm reads, or use Shrink() "
            "(the graph form), which keeps the norm's divisor")


def module_path(n: fx.Node) -> str:
    """The qualified name of the innermost module whose forward made `n` ("" for the root's)."""
    stack = n.meta.get("nn_module_stack") or {}
    return next(reversed(stack), "") if stack else ""


def norm_sites(gm: fx.GraphModule) -> dict[fx.Node, tuple[str, str]]:
    """The nodes Shrink may rewrite to keep a norm's divisor, before it edits: means (an RMSNorm
    written as ops) and norm layers or functions, each with (module path, kind)."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_method" and n.target == "mean" or n.op == "call_function" and n.target is torch.mean:
            out[n] = (module_path(n), "mean")
        elif n.op == "call_function" and n.target in _NORM_FUNCTIONS:
            out[n] = (module_path(n), n.target.__name__)
        elif n.op == "call_module" and (isinstance(m := gm.get_submodule(str(n.target)), _NORMS) or
                                        standardised_conv(m)):
            out[n] = (str(n.target), type(m).__name__)
    return out


def _rewritten(sites: dict[fx.Node, tuple[str, str]]) -> list[tuple[fx.Node, str, str]]:
    """The sites Shrink rewrote into ops that divide by a written width (their node now computes
    ``... / N`` or the norm's last step)."""
    out = []
    for n, (path, kind) in sites.items():
        if n.graph is None or n._erased:
            continue
        was_mean = kind == "mean"
        if was_mean and (n.op != "call_function" or n.target is not operator.truediv):
            continue
        if not was_mean and (n.op == "call_module" or n.target in _NORM_FUNCTIONS):
            continue
        out.append((n, path, kind))
    return out


def _widths(n: fx.Node, kind: str) -> tuple[int, int]:
    """(N, K): the width the rewritten node divides by, and the width it now sees."""
    for m in [n, *n.all_input_nodes, *(a for b in n.all_input_nodes for a in b.all_input_nodes)]:
        if m.op == "call_function" and m.target is operator.truediv and isinstance(m.args[1], int):
            summed = m.args[0]
            x = summed.args[0] if isinstance(summed, fx.Node) and summed.all_input_nodes else None
            if isinstance(x, fx.Node) and x.meta.get("shape"):
                return m.args[1], int(x.meta["shape"][-1])
    raise SurgeryError(f"Shrink(into='modules'): cannot read the widths of the {kind} rewritten at {n.name}")


@torch.no_grad()
def _expected(m: nn.Module, x: torch.Tensor, eps: float, n: int) -> torch.Tensor:
    """What an RMSNorm `m` over N channels gives for `x` (its K kept ones; the rest zero), from
    what it gives over K now."""
    k = x.shape[-1]
    sq = x.double().pow(2)
    ratio = torch.sqrt(sq.sum(-1, keepdim=True) / k + eps) / torch.sqrt(sq.sum(-1, keepdim=True) / n + eps)
    return (m(x).double() * ratio).to(x.dtype)


def _eps_attributes(m: nn.Module) -> dict[str, float]:
    return {k: v for k, v in vars(m).items() if "eps" in k.lower() and isinstance(v, float)}


@torch.no_grad()
def _rescale(m: nn.Module, path: str, n: int, k: int) -> None:
    w = m._parameters.get("weight")
    epsilons = _eps_attributes(m)
    if isinstance(m, getattr(nn, "RMSNorm", ())) and m.eps is None:
        epsilons = {"eps": torch.finfo(w.dtype if w is not None else torch.float32).eps}
    if w is None or len(epsilons) != 1 or w.shape[-1] != k:
        raise SurgeryError(f"Shrink(into='modules'): {type(m).__name__} {path!r} normalises over the pruned stream "
                           "and is no RMSNorm with one weight and one epsilon that surgery can rescale; " + _SUGGEST)
    (name, eps), = epsilons.items()
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(0)).to(w.dtype)
    want = _expected(m, x, eps, n)
    s = math.sqrt(n / k)
    setattr(m, name, eps * n / k)
    for scaled in (w * s, (1 + w) * s - 1):  # w * x / rms, then Gemma's (1 + w) * x / rms
        m._parameters["weight"] = nn.Parameter(scaled, requires_grad=w.requires_grad)
        got = m(x)
        if (got.double() - want.double()).abs().max() <= 1e-5 * max(want.double().abs().max().item(), 1e-12):
            return
    m._parameters["weight"] = w
    setattr(m, name, eps)
    raise SurgeryError(f"Shrink(into='modules'): {type(m).__name__} {path!r} normalises over the pruned stream "
                       f"({k} of {n} channels) and rescaling it as an RMSNorm does not reproduce it: a LayerNorm's "
                       "mean over the original width has no place in its class; " + _SUGGEST)


def rescale_norms(model: nn.Module, sites: dict[fx.Node, tuple[str, str]]) -> set[float]:
    """Rescale, in `model`, every RMSNorm whose stream Shrink cut (see the module docstring);
    refuse the LayerNorms, naming them. Returns the ratios N/K its epsilons were scaled by."""
    done: set[str] = set()
    ratios: set[float] = set()
    for n, path, kind in _rewritten(sites):
        if path in done:
            continue
        done.add(path)
        if kind in STANDARDISED_CONVS:
            raise SurgeryError(f"Shrink(into='modules'): {kind} {path!r} lost input channels: it standardises each "
                               "filter over all its original weights, whose statistics have no place in its class; "
                               + _SUGGEST)
        if kind in ("LayerNorm", "layer_norm", "GroupNorm", "group_norm"):
            raise SurgeryError(f"Shrink(into='modules'): {kind} {path!r} normalises pruned channels: its statistics "
                               "over the original width have no place in its class; " + _SUGGEST)
        try:
            m = model.get_submodule(path)
        except AttributeError:
            raise SurgeryError(f"Shrink(into='modules'): the {kind} at {n.name} normalises pruned channels outside "
                               "any module of the model's own; " + _SUGGEST) from None
        n_all, k = _widths(n, kind)
        _rescale(m, path, n_all, k)
        ratios.add(n_all / k)
    return ratios
