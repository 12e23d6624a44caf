"""Output comparison shared by capture checks, Shrink verification, export and benchmarks."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from .calling import bind_placeholders, call
from .copying import copy_module, tree_modules

__all__ = ["max_abs_diff", "max_rel_diff", "run_eval", "eval_mode", "call", "float64_outputs", "rounding_only"]


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
    mods = model.modules() if isinstance(model, torch.jit.ScriptModule) else tree_modules(model)
    modes = {m: m.training for m in mods if hasattr(m, "training")}  # frozen TorchScript has none
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


# ----------------------------------------------------------------------------- float32 rounding
#: A file that misses its tolerance still matches the model when its outputs are at most this
#: many times as far from the model's float64 result as the model's own float32 run is (see
#: :func:`rounding_only`): a different kernel or summation order rounds differently, no worse.
FLOAT32_FACTOR = 2.0
#: ... as long as the model's own float32 run is this close to float64: past it, float32 outputs
#: carry no meaning to check against, and only an explicit `tol` says what is close enough.
FLOAT32_NOISE_CAP = 1e-3


def _promoted(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.dtype == torch.float32:
        return v.double()
    return torch.float64 if v is torch.float32 else v


class _Float64(fx.Interpreter):
    """Run a graph in float64: float32 tensors and float32 dtype arguments promoted at every
    node, ``.float()`` run as ``.double()`` (a captured graph keeps the casts of the model's code:
    ``x.float()`` in a norm, ``.to(torch.float32)``)."""

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args, kwargs = fx.node.map_aggregate(args, _promoted), fx.node.map_aggregate(kwargs, _promoted)
        target = "double" if n.op == "call_method" and n.target == "float" else n.target
        return getattr(self, n.op)(target, args, kwargs)


@torch.no_grad()
def float64_outputs(model: torch.nn.Module, inputs: Any) -> Any | None:
    """`model`'s outputs on `inputs` computed in float64 (a float64 copy of it, float32 inputs
    promoted, torch's default dtype float64 for the run; a GraphModule's own float32 casts
    promoted too), or None where the model cannot run so. `model` is not changed."""
    previous = torch.get_default_dtype()
    try:
        twin = copy_module(model).double()  # copy-on-write: the casts make new tensors, `model` keeps its own
        torch.set_default_dtype(torch.float64)
        promoted = {k: _promoted(v) for k, v in inputs.items()} if isinstance(inputs, dict) else \
            tuple(_promoted(v) for v in inputs)
        with eval_mode(twin):
            if isinstance(twin, fx.GraphModule):
                return _Float64(twin).run(*bind_placeholders(twin.graph, promoted))
            return call(twin, promoted)
    except Exception:  # an op with no float64 kernel, a model that checks its dtype: no reference
        return None
    finally:
        torch.set_default_dtype(previous)


def rounding_only(model: torch.nn.Module, inputs: Any, ref: Any, out: Any,
                  compare: Any = max_rel_diff) -> tuple[bool, str]:
    """Whether another run's outputs `out` (an exported file's) differ from the model's own float32
    outputs `ref` on `inputs` by float32 rounding only: no further from the model's float64 result
    (by `compare(reference, outputs)`, relative to each output's largest magnitude by default) than
    :data:`FLOAT32_FACTOR` times the model's own distance, itself within :data:`FLOAT32_NOISE_CAP`.
    Also returns what the comparison found, for an error message (starting with a semicolon)."""
    exact = float64_outputs(model, inputs)
    try:
        own, other = (max_rel_diff(exact, ref), compare(exact, out)) if exact is not None else (None, None)
    except ValueError:
        own = other = None
    if own is None:
        return False, "; the model does not run in float64, so float32 rounding cannot be told apart"
    return (own <= FLOAT32_NOISE_CAP and other <= FLOAT32_FACTOR * own,
            f"; from the model run in float64 it is {other:.3g} off, the model's own float32 run {own:.3g}")
