"""Output comparison shared by capture checks, Shrink verification, export and benchmarks."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch
from torch.utils._pytree import tree_flatten

from .calling import call

__all__ = ["max_abs_diff", "max_rel_diff", "run_eval", "eval_mode", "call"]


def _flatten(value: Any) -> tuple[list[Any], Any]:
    """``tree_flatten``, also opening dataclasses that are no pytree node (a plain dataclass
    output would be one leaf, compared with ``!=``, which is ambiguous on tensors)."""
    leaves, spec = tree_flatten(value)
    if not any(dataclasses.is_dataclass(v) and not isinstance(v, type) for v in leaves):
        return leaves, spec
    out: list[Any] = []
    for v in leaves:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out += _flatten([getattr(v, f.name) for f in dataclasses.fields(v)])[0]
        else:
            out.append(v)
    return out, spec


def _pairs(a: Any, b: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    fa, sa = _flatten(a)
    fb, sb = _flatten(b)
    if len(fa) != len(fb):
        raise ValueError(f"outputs differ in structure: {sa} vs {sb}")
    pairs = []
    for x, y in zip(fa, fb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            raise ValueError(f"outputs differ in kind: {type(x).__name__} vs {type(y).__name__}")
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                raise ValueError(f"outputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
            pairs.append((x.detach(), y.detach()))
        elif x != y:
            raise ValueError(f"outputs differ: {x!r} vs {y!r}")
    return pairs


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute elementwise difference between two output pytrees (inf on a NaN
    mismatch); raises ValueError when their structure or shapes differ."""
    worst = 0.0
    for x, y in _pairs(a, b):
        if x.numel() == 0:
            continue
        if x.is_floating_point() or x.is_complex():
            nan_x, nan_y = torch.isnan(x), torch.isnan(y)
            if not torch.equal(nan_x, nan_y):
                return float("inf")
            d = (x - y).abs().masked_fill(nan_x, 0)
        else:
            d = (x.long() - y.long()).abs()
        worst = max(worst, float(d.max()))
    return worst


def max_rel_diff(a: Any, b: Any) -> float:
    """Largest difference relative to the reference's scale: max|a-b| / max(max|a|, 1e-12),
    taken per output tensor."""
    worst = 0.0
    for x, y in _pairs(a, b):
        if x.numel() == 0 or not x.is_floating_point():
            continue
        scale = max(float(x.abs().max()), 1e-12)
        worst = max(worst, float((x - y).abs().max()) / scale)
    return worst


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put every submodule of `model` in eval mode for the block, then restore each one's own
    training flag (a model may mix train and eval submodules)."""
    modes = {m: m.training for m in model.modules() if hasattr(m, "training")}  # frozen TorchScript has none
    if any(modes.values()):
        model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            if m.training != mode:  # setting it goes through nn.Module.__setattr__: only where needed
                m.training = mode


@torch.no_grad()
def run_eval(model: torch.nn.Module, inputs: Any) -> Any:
    """Run `model` on `inputs` (positional, or a dict of keyword inputs: see
    :func:`surgery.calling.call`) in eval mode without gradients, restoring its training flags."""
    with eval_mode(model):
        return call(model, inputs)
