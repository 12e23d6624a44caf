"""Shrink: remove every channel its masks zero, exactly, and verify it.

A channel (of a channel group) is removed only where that is exact: every reader of it sees
zero there, or a constant it can fold into its bias (a Linear, an unpadded Conv). The masks
themselves leave the graph: kept factors of 1 vanish, other kept factors fold into the layer
before the mask where that is exact (BatchNorm, Conv, Linear, through ReLU for positive
factors) and stay as a per-channel ``torch.mul`` by a buffer otherwise. The result is run
against the masked model on the example inputs; a difference raises ShrinkMismatch. A model
captured as an eager shell (detection) has each of its nested graphs shrunk, and is verified whole
and graph by graph: each nested graph's outputs against the masked one's, on the same arguments.

Example::

    >>> import torch, surgery
    >>> from passes import ChannelPrune, Shrink
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3))
    >>> x = torch.randn(1, 3, 16, 16)
    >>> small = surgery.compress(net, [ChannelPrune(ratio=0.5), Shrink()], example_inputs=(x,))
    >>> small.get_submodule("0").out_channels
    8
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..calling import as_inputs, bind_placeholders, call
from ..capture import surgery_meta
from ..channels.groups import ChannelGraph
from ..channels.tree import analyze_tree
from ..copying import copy_module, gc_paused, tree_modules
from ..errors import ShrinkMismatch, SurgeryError
from ..graph import drop_dead_nodes, finish, layer_of
from ..nested import output_items, recording_calls, replay
from ..pipeline import UnitMask
from ..progress import staged
from ..shapes import ShapeProp
from ..verify import eval_mode, max_rel_diff
from .edits import Editor
from .modules import INTO, Before, into_modules
from .plan import Decider

__all__ = ["shrink", "ShrinkReport", "GroupShrink", "shrink_report", "nested_errors"]


@dataclass
class GroupShrink:
    """One group's line in the report."""

    id: int
    producers: list[str]
    before: int
    after: int
    kept: dict[int, str] = field(default_factory=dict)  # channel -> why it stayed despite its mask
    frozen: str | None = None
    graph: str = ""  # the qualified path of the group's graph ("" for the captured graph itself)


@dataclass
class ShrinkReport:
    """What Shrink did: per group, channels before/after and every masked channel it kept, with why."""

    groups: list[GroupShrink]
    params_before: int
    params_after: int
    max_rel_error: float
    masks_scaled: list[str] = field(default_factory=list)
    verify_seconds: float = 0.0  # the two verification runs (masked and shrunk model)
    plan: dict | None = None  # Shrink(into="modules"): what it did, as data (see surgery.shrink.pruning_plan)
    handed: dict = field(default_factory=dict)  # what it kept of tensors handed between nested graphs

    def __str__(self) -> str:
        lines = [f"Shrink: params {self.params_before:,} -> {self.params_after:,} "
                 f"({self.params_after / max(self.params_before, 1):.1%}), max rel. error {self.max_rel_error:.2e}"]
        changed = [g for g in self.groups if g.after != g.before or g.kept]
        lines.append(f"{'group':>5}  {'before':>6}  {'after':>6}  producers")
        for g in changed:
            lines.append(f"{g.id:>5}  {g.before:>6}  {g.after:>6}  {', '.join(g.producers[:3])}"
                         + (" ..." if len(g.producers) > 3 else ""))
            reasons: dict[str, list[int]] = {}
            for c, r in g.kept.items():
                reasons.setdefault(r, []).append(c)
            for r, cs in reasons.items():
                shown = ", ".join(map(str, cs[:8])) + (" ..." if len(cs) > 8 else "")
                lines.append(f"{'':>7}kept {len(cs)} masked channel(s) [{shown}]: {r}")
        if self.masks_scaled:
            lines.append(f"kept as per-channel scales: {', '.join(self.masks_scaled)}")
        lines.append(f"{len(self.groups) - len(changed)} other group(s) unchanged")
        return "\n".join(lines)


def shrink_report(gm: nn.Module) -> ShrinkReport | None:
    """The ShrinkReport attached to a shrunk GraphModule (None when it was not shrunk)."""
    return getattr(gm, "meta", {}).get("surgery", {}).get("shrink_report")


def _n_params(m: nn.Module) -> int:
    """Parameters of `m`, each counted once, those of masks left out."""
    seen: set[int] = set()
    total = 0
    for mod in tree_modules(m):
        if isinstance(mod, UnitMask):
            continue
        for p in mod._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


# ----------------------------------------------------------------------------------------- driver
class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.out: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        r = super().run_node(n)
        if isinstance(r, torch.Tensor):
            self.out[n.name] = r.detach()
        return r


@torch.no_grad()
def _first_difference(a: fx.GraphModule, b: fx.GraphModule, inputs: tuple | dict[str, Any], tol: float
                      ) -> str | None:
    ra, rb = _Recorder(a), _Recorder(b)
    for m in (a, b):
        m.eval()
    ra.run(*bind_placeholders(a.graph, inputs))
    rb.run(*bind_placeholders(b.graph, inputs))
    for n in b.graph.nodes:
        x, y = ra.out.get(n.name), rb.out.get(n.name)
        if x is not None and y is not None and x.shape == y.shape and x.is_floating_point():
            if max_rel_diff(x, y) > tol:
                return n.name
    return None


@staged(lambda gm, *a, **k: "Shrink (and its self-check)")
@gc_paused()
def shrink(gm: fx.GraphModule, example_inputs: Any, tol: float = 1e-4, *, inplace: bool = False,
           into: str = "graph") -> nn.Module:
    """A physically smaller copy of `gm` that computes what `gm` (with its masks) computes.

    `gm` is not mutated unless ``inplace=True`` (what the Shrink pass does: compress() already
    works on a copy). Raises :class:`ShrinkMismatch` if the shrunk model's outputs differ from
    the masked model's on `example_inputs` (positional, or a dict of keyword inputs) by more
    than `tol` (relative to the output's largest magnitude).

    ``into="graph"`` returns the shrunk GraphModule; ``into="modules"`` returns the model in its
    own classes and qualified names, the same edits applied and verified the same way (see
    :mod:`surgery.shrink.modules`), with the report as ``.report`` (unless its class has an
    attribute of that name).
    """
    if into not in INTO:
        raise SurgeryError(f"Shrink: into must be one of {', '.join(map(repr, INTO))}, got {into!r}")
    inputs = as_inputs(example_inputs, gm)
    if inputs is None:
        raise SurgeryError("Shrink needs example_inputs: pass them to compress(..., example_inputs=(x,))")
    if not isinstance(gm, fx.GraphModule):
        raise SurgeryError(f"Shrink needs a captured GraphModule, got {type(gm).__name__}")
    work = gm if inplace else copy_module(gm)  # copy-on-write tensors: the edits make new ones anyway
    params_before = _n_params(gm)
    t0 = time.perf_counter()
    # the masked model's output, and fresh shapes for the analysis; through the graph, not the
    # generated code, which compress may not have regenerated after the mask pass
    args = bind_placeholders(work.graph, inputs)  # keyword inputs by placeholder name: Shrink keeps the names
    with recording_calls(work) as calls:  # what eager code gives nested graphs and gets back: verified too
        ref = ShapeProp(work).propagate(*args)
    verify_seconds = time.perf_counter() - t0
    before = None
    if into == "modules":
        before = Before.of(work)
    edits = [_edit(cg) for cg in analyze_tree(work).values()]  # work's graph, and any nested under eager code
    try:
        t0 = time.perf_counter()
        with recording_calls(work) as again:
            out = ShapeProp(work).propagate(*args)
        kept = _handed_kept(edits)
        errors = _graph_errors(work, calls, again, tol, kept)
        inner_err = max(errors.values(), default=0.0)
        inner_first = next((path for path, e in errors.items() if not e <= tol), None)
        verify_seconds += time.perf_counter() - t0
    except Exception as e:
        raise ShrinkMismatch(float("inf"), None, f"the shrunk model fails to run: {type(e).__name__}: {e}") from e
    try:
        err, how = max(max_rel_diff(ref, out), inner_err), ""
    except ValueError as e:  # a different structure or shape (a detection's number of boxes)
        err, how = float("inf"), f" ({e})"
    if not err <= tol:
        how += _amplified(inner_err, calls, tol)
        if inplace and inner_first is None:
            raise ShrinkMismatch(err, None, "please report this model; Shrink must be exact. "
                                 "surgery.shrink(masked_model, example_inputs) names the first differing node" + how)
        first = inner_first or _first_difference(gm, work, inputs, tol)
        raise ShrinkMismatch(err, first, "please report this model; Shrink must be exact" + how)
    rows = [row for _, cg_rows, _, _ in edits for row in cg_rows]
    report = ShrinkReport(rows, params_before, _n_params(work), err, [s for *_, e in edits for s in e.scaled])
    report.verify_seconds = verify_seconds
    report.handed = kept
    surgery_meta(work)["shrink_report"] = report
    if into == "modules":
        model, report.plan = into_modules(work, inputs, ref, tol, before, [s for *_, e in edits for s in e.selected])
        if not hasattr(model, "report"):
            model.report = report
        return model
    return work


Calls = dict[str, list[tuple[tuple, dict, Any]]]


Kept = dict[tuple, tuple[int, torch.Tensor]]


def _handed_kept(edits: list) -> Kept:
    """What the shrunk graphs keep of each tensor that eager code hands from one nested graph to
    another (see :func:`surgery.channels.boundary.seed`): ``(axis from the end, kept indices)``,
    by ``("out", source path, leaf)`` and by ``("in", target path, placeholder index, item)``."""
    kept: Kept = {}
    for cg, _, removed, _ in edits:
        for (path, leaf), lay in cg.handed.items():
            keep = ~removed[cg.chan_of_elem[lay]]
            axes = [k for k in range(lay.ndim) if lay.shape[k] > 1]
            if not keep.all() and len(axes) == 1:  # channels along one axis, as a feature map's
                line = keep.reshape(-1)
                kept["out", path, leaf] = (axes[0] - lay.ndim, torch.as_tensor(np.nonzero(line)[0]))
        for gm, b in cg.parts[1:]:
            for i, ph in enumerate(gm.graph.find_nodes(op="placeholder")):
                for item, (src, leaf) in ph.meta.get("handoff", {}).items():
                    if ("out", src, leaf) in kept:
                        kept["in", b.path, i, item] = kept["out", src, leaf]
    return kept


def _pick(value: Any, picks: dict[Any, tuple[int, torch.Tensor]]) -> Any:
    """`value` (a tensor, or a tuple, list or dict of them) with the kept channels of the items
    in `picks` (item -> (axis, indices); None: `value` itself) selected."""
    def one(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
        return t.index_select(dim, idx.to(t.device))
    if isinstance(value, torch.Tensor):  # a placeholder's item None; an output's leaf 0
        return one(value, *picks.get(None, picks.get(0)))
    items = [one(v, *picks[j]) if j in picks else v for j, v in enumerate(output_items(value))]
    if not isinstance(value, (list, tuple)):  # a dict (a ModelOutput): compared leaf by leaf, in order
        return items
    return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # a namedtuple too


def _graph_errors(work: fx.GraphModule, calls: Calls, again: Calls, tol: float, kept: Kept) -> dict[str, float]:
    """Per nested graph, the largest relative difference between what it returned in the masked
    run (`calls`) and what its shrunk self returns for the same arguments. The shrunk run's own
    calls (`again`) answer where they agree; where not, eager code may have handed the graph other
    arguments (other proposals), so the graph runs once more on the masked run's. A tensor handed
    from graph to graph is compared, and replayed, on the channels the shrunk graphs keep (`kept`)."""
    def error(outs: list[Any], seen: list[tuple[tuple, dict, Any]], path: str) -> float:
        picks = {k[2]: v for k, v in kept.items() if k[:2] == ("out", path)}
        try:
            return max((max_rel_diff(_pick(ref, picks) if picks else ref, got) for (*_, ref), got in zip(seen, outs)),
                       default=0.0) if len(outs) == len(seen) else float("inf")
        except ValueError:  # a different structure or shape
            return float("inf")

    def narrowed(path: str, args: tuple) -> tuple:
        picks = {k[2:]: v for k, v in kept.items() if k[:2] == ("in", path)}
        return tuple(_pick(a, {item: v for (j, item), v in picks.items() if j == i}) if any(j == i for j, _ in picks)
                     else a for i, a in enumerate(args))

    errors = {}
    for path, seen in calls.items():
        err = error([out for *_, out in again.get(path, [])], seen, path) if again else float("inf")
        if not err <= tol:
            err = error(replay(work, {path: [(narrowed(path, a), kw, o) for a, kw, o in seen]})[path], seen, path)
        errors[path] = err
    return errors


def nested_errors(masked: fx.GraphModule, small: fx.GraphModule, example_inputs: Any) -> dict[str, float]:
    """Graph by graph, for a model with graphs nested under eager code (a detection model): the
    largest difference, relative to each tensor's largest magnitude, between what each nested
    graph of `masked` returns when `masked` runs on `example_inputs` and what the same graph of
    `small` (:func:`shrink` of `masked`) returns for the same arguments; a tensor handed from
    graph to graph is compared, and passed on, on the channels `small` keeps. Shrink checks this
    on its own example inputs; this checks it on others, where eager code between the graphs
    (which proposals pass on) would blur a comparison of the outputs alone."""
    report = shrink_report(small)
    inputs = as_inputs(example_inputs, masked)
    with recording_calls(masked) as calls, torch.no_grad(), eval_mode(masked):
        call(masked, inputs)
    return _graph_errors(small, calls, {}, 0.0, report.handed if report is not None else {})


def _amplified(inner_err: float, calls: Calls, tol: float) -> str:
    """Why an output can differ although every nested graph agrees: the eager code around them."""
    if not calls or not inner_err <= tol:
        return ""
    return (f"; every nested graph agrees on the same inputs (max rel. error {inner_err:.1e}): the eager code "
            "around them turns rounding into a different result (a sort or a threshold on near-equal scores)")


def _edit(cg: ChannelGraph) -> tuple[ChannelGraph, list[GroupShrink], np.ndarray, Editor]:
    """Plan and apply the removals of one analysis (one graph, or graphs that eager code hands
    tensors between), its report rows read before the edits, then regenerate the code of its
    graphs where anything changed."""
    decider = Decider(cg)
    removed = decider.run()
    rows = _rows(cg, decider, removed)  # before the edits, which take dead layers out of the tree
    editor = Editor(cg, removed, decider)
    with torch.no_grad():
        editor.run()
    # a nested graph that nothing touched keeps its code (eager code calls it; nothing else recompiles it)
    if cg.boundary is None or cg.mask_nodes or removed.any():
        for gm, _ in cg.parts:
            drop_dead_nodes(gm.graph)
            finish(gm, lint=False)  # shrink() runs the edited graph next, and raises if it is malformed
    return cg, rows, removed, editor


def _rows(cg: ChannelGraph, decider: Decider, removed: np.ndarray) -> list[GroupShrink]:
    rows = []
    for g in cg.groups:
        names = [layer_of(p.node, p.graph)[0] for p in g.producers]  # qualified: layer1.0.conv2
        rows.append(GroupShrink(g.id, names, g.size, g.size, {}, g.frozen, g.graph))
    chan_group = cg.chan_group  # a group's index within its graph's rows
    for c in np.nonzero(removed)[0]:
        rows[chan_group[c]].after -= 1
    for c, r in decider.reason.items():
        if decider.candidate[c]:
            rows[chan_group[c]].kept[int(cg.local_index[c])] = r
    return rows
