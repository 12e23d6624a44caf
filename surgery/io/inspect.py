"""Model summaries: one row per layer with its shape, parameters, sparsity, mask and MACs.

Works on an eager ``nn.Module``, a captured ``GraphModule``, a TorchScript module and a bare
state_dict (layer types are then guessed from tensor shapes, and MACs need a model).

Example::

    >>> import torch
    >>> from surgery.io.inspect import summary
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 10))
    >>> s = summary(net, input_shape=(1, 1, 8, 8))
    >>> s.totals["params"], s.totals["macs"]
    (1490, 2736)
    >>> [r.name for r in s.rows]
    ['0', '1', '2', '3']

MACs are counted by :func:`surgery.io.macs.count_macs` on a random input of the given shape.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..calling import as_inputs, bind_placeholders
from ..errors import SurgeryError
from .group_table import channel_groups_of, format_groups
from .macs import OTHER, ROOT, count_macs

__all__ = ["LayerRow", "Summary", "summary", "parse_shapes", "count_macs"]

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class LayerRow:
    """One layer: `kept`/`units` are set for mask modules, `macs` when an input was given."""

    name: str
    type: str
    in_: int | None = None
    out: int | None = None
    params: int = 0
    zeros: int = 0   # zeros of the weights: tensors of two or more dimensions (no bias, no norm scale)
    kept: int | None = None
    units: int | None = None
    macs: int | None = None
    weights: int = 0  # elements of those weights

    @property
    def sparsity(self) -> float:
        """Zeros over the elements of the layer's weight matrices and kernels: what pruning zeroes
        (a fresh BatchNorm's zero biases are not sparsity)."""
        return self.zeros / self.weights if self.weights else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["in"] = d.pop("in_")
        d["sparsity"] = round(self.sparsity, 6)
        return d


@dataclass
class Summary:
    """What :func:`summary` returns: `rows`, `totals`, optional channel `groups`, `notes`.

    ``str(s)`` is a table; ``s.to_json()`` the same data as one JSON document.
    """

    rows: list[LayerRow]
    totals: dict[str, Any]
    source: str = ""
    kind: str = "module"
    input_shapes: list[tuple[int, ...]] | None = None
    groups: list[dict[str, Any]] | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind,
                "input_shapes": [list(s) for s in self.input_shapes] if self.input_shapes else None,
                "rows": [r.as_dict() for r in self.rows], "totals": dict(self.totals),
                "groups": self.groups, "notes": list(self.notes)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.as_dict(), indent=indent)

    def table(self) -> str:
        show_macs = self.totals.get("macs") is not None
        head = ["layer", "type", "in", "out", "params", "sparsity", "mask"] + (["MACs"] if show_macs else [])
        body = []
        for r in self.rows:
            cells = [r.name, r.type, _opt(r.in_), _opt(r.out), f"{r.params:,}",
                     f"{100 * r.sparsity:.1f}%" if r.weights else "",
                     f"{r.kept}/{r.units}" if r.units is not None else ""]
            if show_macs:
                cells.append(human(r.macs) if r.macs else "")
            body.append(cells)
        t = self.totals
        foot = ["total", f"{t['layers']} layers", "", "", f"{t['params']:,}", f"{100 * t['sparsity']:.1f}%",
                f"{t['mask_kept']}/{t['mask_units']}" if t["masks"] else ""]
        if show_macs:
            foot.append(human(t["macs"]))
        widths = [max(len(row[i]) for row in [head, foot, *body]) for i in range(len(head))]
        right = {2, 3, 4, 5, 6, 7}

        def fmt(cells: list[str]) -> str:
            return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

        rule = "  ".join("-" * w for w in widths)
        lines = [fmt(head), rule, *map(fmt, body), rule, fmt(foot)]
        if self.source:
            lines.insert(0, f"{self.source} ({self.kind})")
        if t.get("buffers"):
            lines.append(f"buffers: {t['buffers']:,} values (not counted as parameters)")
        if self.groups is not None:
            lines += ["", *format_groups(self.groups)]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = table


def _opt(v: int | None) -> str:
    return "" if v is None else str(v)


def human(n: int | float | None) -> str:
    """1234567 -> '1.23M'."""
    if n is None:
        return ""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def parse_shapes(spec: str | Sequence[int] | Sequence[Sequence[int]] | None) -> list[tuple[int, ...]] | None:
    """'1,3,224,224' -> [(1, 3, 224, 224)]; 'a;b' gives one shape per positional input.
    Also accepts a tuple of ints or a list of them."""
    if spec is None:
        return None
    if isinstance(spec, str):
        try:
            shapes = [tuple(int(d) for d in part.replace("x", ",").split(","))
                      for part in spec.split(";") if part.strip()]
        except ValueError:
            raise SurgeryError(f"bad input shape {spec!r}: expected comma-separated integers such as "
                               "1,3,224,224 (separate several inputs with ';')") from None
    elif all(isinstance(d, int) for d in spec):
        shapes = [tuple(spec)]
    else:
        shapes = [tuple(int(d) for d in s) for s in spec]
    if not shapes or any(not s or min(s) <= 0 for s in shapes):
        raise SurgeryError(f"bad input shape {spec!r}: every dimension must be a positive integer")
    return shapes


def _type_name(m: nn.Module) -> str:
    return getattr(m, "original_name", None) or type(m).__name__ if isinstance(m, torch.jit.ScriptModule) \
        else type(m).__name__


def _attr(m: nn.Module, *names: str) -> Any:
    for n in names:
        try:
            v = getattr(m, n)
        except Exception:  # ScriptModules raise RuntimeError for some missing attributes
            continue
        if v is not None and not callable(v):
            return v
    return None


def _in_out(m: nn.Module, weight: Tensor | None) -> tuple[int | None, int | None]:
    i, o = _attr(m, "in_channels", "in_features", "num_embeddings"), \
        _attr(m, "out_channels", "out_features", "embedding_dim")
    if i is None and o is None:
        n = _attr(m, "num_features", "num_channels", "embed_dim")
        if n is None and (shape := _attr(m, "normalized_shape")) is not None:
            n = math.prod(shape) if isinstance(shape, (tuple, list)) else shape
        i = o = n
    if i is None and o is None and weight is not None:
        i, o = _shape_in_out(weight, _attr(m, "groups") or 1)
    return (int(i) if isinstance(i, int) else None, int(o) if isinstance(o, int) else None)


def _shape_in_out(w: Tensor, groups: int = 1) -> tuple[int | None, int | None]:
    if w.dim() == 1:
        return w.shape[0], w.shape[0]
    if w.dim() >= 2:
        return w.shape[1] * groups, w.shape[0]
    return None, None


def _mask_counts(m: nn.Module) -> tuple[int | None, int | None]:
    from ..pipeline import Mask
    if isinstance(m, torch.jit.ScriptModule) or not isinstance(m, Mask):
        return None, None
    try:
        kept = m.kept().detach().reshape(-1)
    except Exception:
        return None, None
    return int(kept.sum()), int(kept.numel())


def _own_tensors(m: nn.Module, seen: set[int]) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
    """(parameters `m` owns, the tensors its forward uses for them, its weight) without those
    in `seen`. A parametrized tensor (torch.nn.utils.parametrize, e.g. MagnitudePrune's masks)
    belongs to the layer, and its sparsity is that of the weight the layer computes with."""
    from torch.nn.utils import parametrize
    own, used = [], []
    for _, p in m.named_parameters(recurse=False):
        if id(p) not in seen:
            seen.add(id(p))
            own.append(p)
            used.append(p)
    weight = dict(m.named_parameters(recurse=False)).get("weight")
    if parametrize.is_parametrized(m):
        for attr, plist in m.parametrizations.items():
            originals = [p for _, p in plist.named_parameters(recurse=False) if id(p) not in seen]
            seen.update(id(p) for p in originals)
            if originals:
                own += originals
                with torch.no_grad():
                    used.append(getattr(m, attr).detach())
            if attr == "weight":
                weight = getattr(m, attr)
    return own, used, weight


def _weight_zeros(tensors: Any) -> tuple[int, int]:
    """(zeros, elements) of the tensors with two or more dimensions: the weights pruning zeroes."""
    weights = [t for t in tensors if t.dim() >= 2]
    return sum(int((t == 0).sum()) for t in weights), sum(t.numel() for t in weights)


def _frozen_constants(model: nn.Module) -> list[Tensor]:
    """The tensors a frozen TorchScript module (``torch.jit.freeze``) holds as graph constants;
    [] for anything else."""
    if not isinstance(model, torch.jit.ScriptModule) or next(model.parameters(), None) is not None:
        return []
    try:
        nodes = model.graph.findAllNodes("prim::Constant")
    except (AttributeError, RuntimeError):
        return []
    return [n.output().toIValue() for n in nodes if isinstance(n.output().type(), torch._C.TensorType)]


def _module_rows(model: nn.Module) -> tuple[list[LayerRow], int]:
    frozen = _frozen_constants(model)
    if frozen:
        return [LayerRow(ROOT, "frozen constants", None, None, sum(t.numel() for t in frozen),
                         *_weight_zeros(frozen))], 0
    rows, seen, buffers = [], set(), 0
    for name, m in model.named_modules():
        own, used, weight = _own_tensors(m, seen)
        buffers += sum(b.numel() for _, b in m.named_buffers(recurse=False))
        is_leaf = next(iter(m.children()), None) is None
        if not (is_leaf or own):
            continue
        i, o = _in_out(m, weight)
        kept, units = _mask_counts(m)
        zeros, weights = _weight_zeros(used)
        rows.append(LayerRow(name or ROOT, _type_name(m), i, o, sum(p.numel() for p in own), zeros, kept, units,
                             weights=weights))
    return rows, buffers


def _guess_type(tensors: dict[str, Tensor]) -> str:
    w = tensors.get("weight")
    if "running_mean" in tensors:
        return "BatchNorm?"
    if w is None:
        return "tensors"
    return {1: "Norm?", 2: "Linear?", 3: "Conv1d?", 4: "Conv2d?", 5: "Conv3d?"}.get(w.dim(), "tensors")


def _state_dict_rows(sd: dict[str, Tensor]) -> tuple[list[LayerRow], int]:
    layers: dict[str, dict[str, Tensor]] = {}
    for key, t in sd.items():
        prefix, _, leaf = key.rpartition(".")
        layers.setdefault(prefix, {})[leaf] = t
    rows, buffers = [], 0
    for prefix, tensors in layers.items():
        params = {k: t for k, t in tensors.items() if not k.endswith(BUFFER_SUFFIXES)}
        buffers += sum(t.numel() for k, t in tensors.items() if k not in params)
        w = params.get("weight")
        i, o = _shape_in_out(w) if w is not None else (None, None)
        zeros, weights = _weight_zeros(params.values())
        rows.append(LayerRow(prefix or ROOT, _guess_type(tensors), i, o, sum(t.numel() for t in params.values()),
                             zeros, weights=weights))
    return rows, buffers


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def summary(model: nn.Module | dict, input_shape: Any = None, *, inputs: tuple | dict[str, Any] | None = None,
            groups: bool = False, source: str = "", kind: str | None = None) -> Summary:
    """Summarise `model` (an nn.Module, GraphModule, TorchScript module or a state_dict).

    Args:
        input_shape: e.g. ``(1, 3, 224, 224)`` or ``"1,3,224,224"`` (``"a;b"`` for several
            inputs): MACs are counted on random float inputs of that shape.
        inputs: real example inputs instead of `input_shape` (integer token ids, say): a tuple
            of positional inputs, or a dict of keyword inputs (``{"input_ids": ids}``).
        groups: also compute channel groups (``surgery.channels.channel_groups``).
    """
    shapes = parse_shapes(input_shape)
    if inputs is None and shapes is not None:
        gen = torch.Generator().manual_seed(0)
        inputs = tuple(torch.randn(s, generator=gen) for s in shapes)
    notes: list[str] = []
    group_list = None
    counted = False  # MACs were counted (a model ran on the inputs)
    if is_state_dict(model):
        rows, buffers = _state_dict_rows(model)
        kind = kind or "state_dict"
        notes.append("a state_dict holds no code: layer types are guessed from tensor shapes (marked ?)")
        if inputs is not None:
            notes.append("MACs need a model, not a state_dict")
        if groups:
            notes.append("channel groups need a model, not a state_dict")
        macs = None
    elif isinstance(model, nn.Module):
        rows, buffers = _module_rows(model)
        kind = kind or ("torchscript" if isinstance(model, torch.jit.ScriptModule) else "module")
        if rows and rows[0].type == "frozen constants":
            notes.append("frozen TorchScript: the weights (BatchNorm folded into them by the freeze) are graph constants, "
                         "counted together as parameters; there are no layers to list")
        macs = None
        inputs = as_inputs(inputs, model)
        if inputs is not None:
            macs, counted = count_macs(model, inputs, [r.name for r in rows]), True
            for r in rows:
                r.macs = macs.pop(r.name, 0)
            if macs.get(OTHER) or macs.get(ROOT):
                rows.append(LayerRow(OTHER, "ops outside layers", macs=macs.pop(OTHER, 0) + macs.pop(ROOT, 0)))
            # anything left was credited to a container module: give it a row of its own
            rows += [LayerRow(n, "ops in forward", macs=v) for n, v in macs.items() if v]
        if groups:
            if isinstance(model, fx.GraphModule) and isinstance(inputs, dict):
                inputs = bind_placeholders(model.graph, inputs)  # the group table runs the graph positionally
            group_list, why = channel_groups_of(model, inputs)
            if why:
                notes.append(why)
    else:
        raise SurgeryError(f"cannot summarise a {type(model).__name__}: expected an nn.Module or a state_dict")
    mask_rows = [r for r in rows if r.units is not None]
    params = sum(r.params for r in rows)
    zeros, weights = sum(r.zeros for r in rows), sum(r.weights for r in rows)
    totals = {"layers": sum(1 for r in rows if r.name != OTHER), "params": params, "zeros": zeros,
              "sparsity": round(zeros / weights, 6) if weights else 0.0, "buffers": buffers,
              "masks": len(mask_rows), "mask_kept": sum(r.kept for r in mask_rows),
              "mask_units": sum(r.units for r in mask_rows),
              "macs": sum(r.macs or 0 for r in rows) if counted else None}
    return Summary(rows, totals, source, kind, shapes, group_list, notes)
