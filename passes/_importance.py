"""Channel importance for ChannelPrune: one score per channel of a group, summed over the group.

Weight criteria read the weights only:

- ``l1`` / ``l2``: the norm of each producer's output weights (a conv's filter, a linear layer's row);
- ``bn_scale``: |gamma| of the group's BatchNorms (``l1`` where there is none);
- ``lamp``: LAMP (Lee et al., 2021) on the squared ``l2`` scores: a channel's score over the sum of
  the scores at least as large, so that every group's largest channel scores 1 and rankings across
  groups of different scale compare;
- ``random``.

Data criteria run the model on ``calibration`` batches, streamed (statistics are accumulated batch
by batch; no activation is kept), in eval mode (BatchNorm statistics and dropout untouched):

- ``activation`` (Wanda, Sun et al., 2023, per channel): for each layer that reads the group with
  its weights, ``sum_i |W[i, c]| * ||X[:, c]||_2``, the input's norm over every batch and position;
  a group that no weighted layer reads (attention's q and k) uses its producers' output norm times
  their output weights. Forward only, under ``torch.no_grad``.
- ``taylor`` (first order, Molchanov et al., 2019): ``sum |w * dL/dw|`` over every weight of the
  group (producers' rows and biases, norms' scales, readers' columns), the gradient summed over
  the batches.
- ``hessian``: the diagonal-Fisher approximation of Optimal Brain Damage, ``1/2 sum w**2 * F`` with
  ``F = sum over batches of (dL/dw)**2`` (per-batch gradients: the empirical Fisher of the batches).

Gradients come from ``torch.autograd.grad``: nothing is written to any parameter's ``.grad``.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from surgery.calling import as_inputs, call
from surgery.channels import ChannelGroup
from surgery.errors import SurgeryError, first_line
from surgery.graph import layer_of
from surgery.verify import eval_mode

__all__ = ["WEIGHT_CRITERIA", "DATA_CRITERIA", "GRADIENT_CRITERIA", "weight_scores", "data_scores", "split_batch"]

WEIGHT_CRITERIA = ("l1", "l2", "bn_scale", "lamp", "random")
GRADIENT_CRITERIA = ("taylor", "hessian")
DATA_CRITERIA = ("activation", *GRADIENT_CRITERIA)


# ----------------------------------------------------------------------------- weight criteria
def weight_scores(criterion: str, g: ChannelGroup, seed: int = 0) -> np.ndarray:
    """Scores of `g`'s channels by a weight criterion (see the module doc)."""
    if criterion == "random":
        return np.random.default_rng(seed + g.id).random(g.size)
    if criterion == "lamp":
        return _lamp(_norms(g, 2) ** 2)
    if criterion == "bn_scale":
        s = np.zeros(g.size)
        for p in g.locals:
            _, m = layer_of(p.node)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                w = m.weight.detach().abs().double().numpy()  # small: one value per channel
                ok = p.channels >= 0
                np.add.at(s, p.channels[ok], w[ok])
        if s.any():
            return s
    return _norms(g, 2 if criterion == "l2" else 1)


def _norms(g: ChannelGroup, order: int) -> np.ndarray:
    """Per channel, the sum over producers of the norm of the tensor each makes its channels with,
    on the axis the rule recorded (a conv's weight on 0, a transposed conv's or an embedding's on 1)."""
    s = np.zeros(g.size)
    for p in g.producers:
        held = [(o, n, d) for o, n, d in p.params if n == "weight"] or p.params[:1]
        w = getattr(held[0][0], held[0][1], None) if held else None
        if not isinstance(w, torch.Tensor) or w.dim() == 0:
            continue
        _scatter(s, p.channels, position_norms(w.detach(), held[0][2], order))
    return s


_CHUNK = 1 << 18  # elements per block of position_norms: a 1 MiB float32 buffer, cache-sized


def position_norms(w: torch.Tensor, axis: int, order: int) -> np.ndarray:
    """The `order`-norm (1 or 2) of each slice of `w` along `axis` (one value per position), in
    float64.

    One pass over `w` in blocks of its first axis, each block's |w| or w**2 written into one
    cache-sized buffer and summed there. torch's own ``vector_norm`` is as fast for the l2 norm of
    rows and is used for it; for the rest it is slow: ~1 ns an element for l1 rows (a ResNet-18's
    weights: 10.4 ms, against 4.4 ms here) and ~4 ns for columns, the strided reduction of an
    embedding's hidden axis (BERT-base's 30522x768 table: 100 ms, against 7.5 ms here).

        >>> position_norms(torch.tensor([[3.0, -4.0], [0.0, 1.0]]), 1, 1)
        array([3., 5.])
    """
    axis %= max(w.dim(), 1)
    half = w.dtype in (torch.float16, torch.bfloat16)  # summed in float32: a half sum rounds to 3 digits
    if w.dim() < 2 or w.numel() <= _CHUNK or not w.is_floating_point() or order == 2 and axis == 0:
        rows = w.movedim(axis, 0).reshape(w.shape[axis], -1) if w.dim() else w.reshape(1, 1)
        return torch.linalg.vector_norm(rows, order, dim=1, dtype=torch.float32 if half else None).double().numpy()
    w = w.contiguous()
    n0 = w.shape[0]
    step = max(1, _CHUNK // (w.numel() // n0))
    buf = torch.empty((min(step, n0), *w.shape[1:]), dtype=torch.float32 if half else w.dtype)
    rest = [d for d in range(w.dim()) if d != axis]
    out = torch.zeros(w.shape[axis], dtype=torch.float64)
    for i in range(0, n0, step):
        block = w[i:i + step]
        b = buf[:len(block)]
        if half:
            b.copy_(block)
            block = b
        if order == 1:
            torch.abs(block, out=b)
        else:
            torch.mul(block, block, out=b)
        total = b.sum(dim=rest)
        if axis == 0:
            out[i:i + len(block)] = total
        else:
            out += total
    return (out if order == 1 else out.sqrt()).numpy()


def _lamp(s: np.ndarray) -> np.ndarray:
    """LAMP scores: ``s[i] / sum(s[j] for s[j] >= s[i])`` (ties broken by position, stably)."""
    order = np.argsort(s, kind="stable")
    ranked = s[order]
    tail = np.cumsum(ranked[::-1])[::-1]
    out = np.zeros_like(s, dtype=np.float64)
    out[order] = ranked / np.maximum(tail, 1e-300)
    return out


def _scatter(s: np.ndarray, channels: np.ndarray, values: np.ndarray) -> bool:
    """Add `values` (one per position) to the channels the positions hold; False when the
    lengths differ (a grouped layer whose weight axis is not one position per channel)."""
    if len(values) != len(channels):
        return False
    ok = channels >= 0
    np.add.at(s, channels[ok], values[ok])
    return True


def _along(t: torch.Tensor, axis: int) -> torch.Tensor:
    """`t` with every axis but `axis` summed: one value per position along it (float64)."""
    axis = axis % t.dim()
    dims = [d for d in range(t.dim()) if d != axis]
    return (t.sum(dim=dims) if dims else t).double()


# ----------------------------------------------------------------------------- calibration batches
def split_batch(batch: Any, n_inputs: int, need_target: bool, index: int) -> tuple[tuple | dict, Any]:
    """One calibration batch as (model inputs, target).

    A batch is the model's inputs (a tensor, a tuple of positional inputs, a dict of keyword
    inputs) or an ``(inputs, target)`` pair. With a loss (gradient criteria) every batch must be a
    pair. Without one, a two-item batch is a pair when its first item is a tuple, list or dict, or
    when the model takes one input (a DataLoader's ``(x, y)``); the target is then unused.
    """
    pair = isinstance(batch, (tuple, list)) and len(batch) == 2
    if need_target:
        if not pair:
            raise SurgeryError(f"ChannelPrune: calibration batch {index} must be an (inputs, target) pair for "
                               f"loss_fn, got {_describe(batch)}")
        return as_inputs(batch[0]), batch[1]
    if pair and (isinstance(batch[0], (tuple, list, dict)) or n_inputs == 1):
        return as_inputs(batch[0]), batch[1]
    return as_inputs(batch), None


def _describe(batch: Any) -> str:
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} item(s)"
    return type(batch).__name__


def _batches(calibration: Iterable, gm: fx.GraphModule, need_target: bool, desc: str):
    """(index, inputs, target) for each batch, with a progress bar when stderr is a terminal."""
    n_inputs = sum(1 for n in gm.graph.find_nodes(op="placeholder") if not n.args and not str(n.target)[:1] == "*")
    try:
        from tqdm.auto import tqdm
        it = tqdm(calibration, desc=desc, unit="batch", file=sys.stderr, disable=not sys.stderr.isatty(),
                  leave=False)
    except ImportError:  # tqdm is optional at run time
        it = calibration
    n = -1
    for n, batch in enumerate(it):
        inputs, target = split_batch(batch, n_inputs, need_target, n)
        yield n, inputs, target
    if n < 0:
        raise SurgeryError("ChannelPrune: calibration gave no batches")


def _run(gm: fx.GraphModule, inputs: Any, index: int) -> Any:
    try:
        return call(gm, inputs)
    except Exception as e:
        raise SurgeryError(f"ChannelPrune: the model fails on calibration batch {index}: {first_line(e)}") from e


# ----------------------------------------------------------------------------- data criteria
def _module_of(node: fx.Node) -> nn.Module | None:
    """The module a call_module node calls (in the node's own graph), else None."""
    if node.op != "call_module":
        return None
    try:
        return node.graph.owning_module.get_submodule(str(node.target))
    except AttributeError:
        return None


def _weight(params: list) -> tuple[torch.Tensor, int] | None:
    held = [(o, n, d) for o, n, d in params if n == "weight"]
    if not held:
        return None
    w = getattr(held[0][0], held[0][1], None)
    return (w, held[0][2]) if isinstance(w, torch.Tensor) and w.dim() > 1 else None


def data_scores(criterion: str, gm: fx.GraphModule, groups: list[ChannelGroup], calibration: Iterable,
                loss_fn: Callable[[Any, Any], torch.Tensor] | None) -> dict[int, np.ndarray]:
    """Scores of every group's channels by a data criterion (see the module doc), from one pass
    over `calibration`."""
    if criterion == "activation":
        return _activation(gm, groups, calibration)
    return _gradient(criterion, gm, groups, calibration, loss_fn)


def _activation(gm: fx.GraphModule, groups: list[ChannelGroup], calibration: Iterable) -> dict[int, np.ndarray]:
    # sites: (group, place, module, "in"/"out", arg, dim, weight factor per position)
    sites = []
    for g in groups:
        found = []
        for role, places in (("in", g.readers), ("out", g.producers)):
            if found:
                break  # producers only for a group that no weighted layer reads
            for p in places:
                m, w = _module_of(p.node), _weight(p.params)
                if m is None or w is None:
                    continue
                factor = _along(w[0].detach().abs(), w[1])
                if len(factor) == len(p.channels):
                    found.append((g, p, m, role, p.arg or 0, p.dim, factor))
        sites += found
    sums: dict[tuple, torch.Tensor] = {}

    def hook(m: nn.Module, args: tuple, out: Any) -> None:
        for key in by_module[m]:
            _, role, arg, dim = key
            t = out if role == "out" else (args[arg] if arg < len(args) else None)
            if isinstance(t, torch.Tensor) and t.dim() > dim:
                sq = _along(t.detach().float() ** 2, dim)
                sums[key] = sums[key] + sq if key in sums else sq
    by_module: dict[nn.Module, list[tuple]] = {}
    for _, _, m, role, arg, dim, _ in sites:
        key = (id(m), role, arg, dim)
        if key not in by_module.setdefault(m, []):
            by_module[m].append(key)
    handles = [m.register_forward_hook(hook) for m in by_module]
    try:
        with eval_mode(gm), torch.no_grad():
            for n, inputs, _ in _batches(calibration, gm, False, "calibration (activation)"):
                _run(gm, inputs, n)
    finally:
        for h in handles:
            h.remove()
    scores = {g.id: np.zeros(g.size) for g in groups}
    for g, p, m, role, arg, dim, factor in sites:
        sq = sums.get((id(m), role, arg, dim))
        if sq is not None and len(sq) == len(p.channels):
            _scatter(scores[g.id], p.channels, (sq.sqrt() * factor).numpy())
    return scores


def _gradient(criterion: str, gm: fx.GraphModule, groups: list[ChannelGroup], calibration: Iterable,
              loss_fn: Callable[[Any, Any], torch.Tensor] | None) -> dict[int, np.ndarray]:
    entries = []  # (group, place, parameter, axis)
    params: dict[int, nn.Parameter] = {}
    for g in groups:
        for p in g.places():
            for owner, name, axis in p.params:
                t = getattr(owner, name, None)
                if isinstance(t, nn.Parameter) and t.is_floating_point():
                    entries.append((g, p, t, axis))
                    params.setdefault(id(t), t)
    plist = list(params.values())
    acc = [torch.zeros_like(t, dtype=torch.float64) for t in plist]
    flags = [t.requires_grad for t in plist]
    try:
        for t in plist:
            t.requires_grad_(True)
        with eval_mode(gm), torch.enable_grad():
            for n, inputs, target in _batches(calibration, gm, True, f"calibration ({criterion})"):
                loss = loss_fn(_run(gm, inputs, n), target)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise SurgeryError(f"ChannelPrune: loss_fn must return a scalar tensor, got {_describe(loss)}")
                grads = torch.autograd.grad(loss.reshape(()), plist, allow_unused=True)
                for a, gr in zip(acc, grads):
                    if gr is not None:
                        a.add_(gr.detach().double() if criterion == "taylor" else gr.detach().double() ** 2)
    finally:
        for t, flag in zip(plist, flags):
            t.requires_grad_(flag)
    total = {id(t): a for t, a in zip(plist, acc)}
    scores = {g.id: np.zeros(g.size) for g in groups}
    for g, p, t, axis in entries:
        w, a = t.detach().double(), total[id(t)]
        per = (w * a).abs() if criterion == "taylor" else 0.5 * w ** 2 * a
        _scatter(scores[g.id], p.channels, _along(per, axis).numpy())
    return scores
