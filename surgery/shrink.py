"""Shrink: remove every channel its masks zero, exactly, and verify it.

A channel (of a channel group) is removed only where that is exact: every reader of it sees
zero there, or a constant it can fold into its bias (a Linear, an unpadded Conv). The masks
themselves leave the graph: kept factors of 1 vanish, other kept factors fold into the layer
before the mask where that is exact (BatchNorm, Conv, Linear, through ReLU for positive
factors) and stay as a per-channel ``torch.mul`` by a buffer otherwise. The result is run
against the masked model on the example inputs; a difference raises ShrinkMismatch.

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

import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .capture import ShapeProp, as_inputs, surgery_meta
from .channels import ChannelGraph, _RawPlace, analyze, varying
from .errors import ShrinkMismatch, SurgeryError
from .graph import finish, unique_name
from .pipeline import UnitMask
from .verify import max_rel_diff

__all__ = ["shrink", "ShrinkReport", "GroupShrink", "shrink_report"]

_RESHAPES = {"view", "reshape", "transpose", "permute", "contiguous", "flatten"}


@dataclass
class GroupShrink:
    """One group's line in the report."""

    id: int
    producers: list[str]
    before: int
    after: int
    kept: dict[int, str] = field(default_factory=dict)  # channel -> why it stayed despite its mask
    frozen: str | None = None


@dataclass
class ShrinkReport:
    """What Shrink did: per group, channels before/after and every masked channel it kept, with why."""

    groups: list[GroupShrink]
    params_before: int
    params_after: int
    max_rel_error: float
    masks_scaled: list[str] = field(default_factory=list)

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
    return sum(p.numel() for n, p in m.named_parameters() if not _is_mask_param(m, n))


def _is_mask_param(m: nn.Module, name: str) -> bool:
    prefix = name.rpartition(".")[0]
    try:
        return isinstance(m.get_submodule(prefix), UnitMask) if prefix else False
    except AttributeError:
        return False


# ----------------------------------------------------------------------------------------- decisions
class _Decider:
    def __init__(self, cg: ChannelGraph):
        self.cg = cg
        nc = len(cg.group_of_chan)
        self.chan = cg.chan_of_elem
        self.candidate = np.zeros(nc, dtype=bool)
        self.keep = np.zeros(nc, dtype=bool)
        self.reason: dict[int, str] = {}
        self.chain_inner: set[fx.Node] = set()
        self.chains: list[tuple[fx.Node, fx.Node, int]] = []

    def mark(self, chans: np.ndarray, reason: str) -> bool:
        chans = np.unique(chans)
        new = chans[self.candidate[chans] & ~self.keep[chans]]
        if len(new) == 0:
            return False
        self.keep[new] = True
        for c in new:
            self.reason.setdefault(int(c), reason)
        return True

    def removed(self) -> np.ndarray:
        return self.candidate & ~self.keep

    def run(self) -> np.ndarray:
        cg = self.cg
        gm = cg.gm
        for p in cg.places:
            if p.role == "mask":
                f = gm.get_submodule(str(p.node.target)).factors().detach().cpu().numpy()
                self.candidate[self.chan[p.ids[f == 0]]] = True
        for c, r in cg.frozen_chan.items():
            self.mark(np.array([c]), f"group frozen: {r}")
        for p in cg.places:
            if p.role == "reader":
                self._reader(p)
        self._find_chains()
        while self._structure():
            pass
        return self.removed()

    def _reader(self, p: _RawPlace) -> None:
        v = p.values if p.values is not None else np.full(len(p.ids), np.nan)
        chans = self.chan[p.ids]
        fold = _foldable(p)
        bad = ~((v == 0) | (np.isfinite(v) & fold))
        if bad.any():
            what = "a constant it cannot fold (zero padding)" if fold is False and np.isfinite(v[bad]).any() \
                else "a nonzero value"
            self.mark(chans[bad], f"{_who(p.node)} reads {what} in it")

    def _find_chains(self) -> None:
        """view -> transpose -> view channel shuffles: replaced by one index_select, so their
        intermediate layouts need no rectangular structure."""
        cg = self.cg
        for node, lay in cg.layouts.items():
            if not isinstance(lay, np.ndarray) or len(varying(lay)) < 2 or not _is_reshape(node):
                continue
            start = node.args[0]
            while _is_reshape(start) and isinstance(cg.layouts.get(start), np.ndarray) \
                    and len(varying(cg.layouts[start])) >= 2:
                start = start.args[0]
            end = node
            while len(end.users) == 1 and _is_reshape(next(iter(end.users))) \
                    and len(varying(cg.layouts.get(end, np.zeros(1)))) >= 2:
                end = next(iter(end.users))
            s_lay, e_lay = cg.layouts.get(start), cg.layouts.get(end)
            if not isinstance(s_lay, np.ndarray) or not isinstance(e_lay, np.ndarray):
                continue
            if len(varying(s_lay)) != 1 or len(varying(e_lay)) != 1 or varying(s_lay) != varying(e_lay):
                continue
            line = s_lay.reshape(-1)
            if len(np.unique(line)) != len(line) or not np.isin(e_lay.reshape(-1), line).all():
                continue
            inner = set()
            n = end
            while n is not start:
                inner.add(n)
                n = n.args[0]
            inner.discard(end)
            if (start, end, varying(s_lay)[0]) not in self.chains:
                self.chains.append((start, end, varying(s_lay)[0]))
            self.chain_inner |= inner

    def _structure(self) -> bool:
        """Force-keep channels until every tensor stays rectangular and non-empty, grouped
        convolutions keep equal channels per group, and integer indices stay valid."""
        changed = False
        removed = self.removed()
        for node, lay in self.cg.layouts.items():
            for part in (lay if isinstance(lay, tuple) else (lay,)):
                if not isinstance(part, np.ndarray) or node in self.chain_inner:
                    continue
                changed |= self._rect(node, part, removed)
        for p in self.cg.places:
            if p.groups > 1:
                kept = ~removed[self.chan[p.ids]]
                seg = kept.reshape(p.groups, -1)
                want = seg.sum(1).max()
                for g in range(p.groups):
                    short = want - seg[g].sum()
                    if short > 0:
                        pos = np.nonzero(~seg[g])[0][:short] + g * seg.shape[1]
                        changed |= self.mark(self.chan[p.ids[pos]],
                                             f"{_who(p.node)} needs the same number of channels in each of "
                                             f"its {p.groups} groups")
        for node in self.cg.rewrite:
            if node.op == "call_function" and node.target is operator.getitem:
                changed |= self._int_index(node, removed)
        return changed

    def _rect(self, node: fx.Node, lay: np.ndarray, removed: np.ndarray) -> bool:
        vd = varying(lay)
        if not vd:
            return False
        kept = ~removed[self.chan[lay]]
        if kept.all():
            return False
        if not kept.any():
            first = lay[tuple(0 for _ in lay.shape)]
            return self.mark(self.chan[np.array([first])], f"{node.name!r} would lose every channel")
        if len(vd) < 2:
            return False
        axes = [kept.any(axis=tuple(d for d in range(lay.ndim) if d != k)) for k in range(lay.ndim)]
        full = np.ones(lay.shape, dtype=bool)
        for k, a in enumerate(axes):
            shp = [1] * lay.ndim
            shp[k] = lay.shape[k]
            full &= a.reshape(shp)
        hole = full & ~kept
        if hole.any():
            return self.mark(self.chan[lay[hole]], f"{node.name!r} spreads channels over several axes "
                                                   "and must stay rectangular")
        return False

    def _int_index(self, node: fx.Node, removed: np.ndarray) -> bool:
        src = self.cg.layouts.get(node.args[0])
        if not isinstance(src, np.ndarray):
            return False
        items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        d = 0
        changed = False
        for i in _expand_index(items, src.ndim):
            if i is None:
                continue
            if isinstance(i, int) and src.shape[d] > 1:
                sel = np.take(src, i, axis=d)
                changed |= self.mark(self.chan[sel], f"{node.name!r} picks one of these channels by index")
            d += 1
        return changed


def _expand_index(items, nd: int) -> list:
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    out: list = []
    for i in items:
        if i is Ellipsis:
            out += [slice(None)] * (nd - used)
        else:
            out.append(i)
    return out


def _is_reshape(n: Any) -> bool:
    if not isinstance(n, fx.Node):
        return False
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    return n.op in ("call_method", "call_function") and name in _RESHAPES


def _who(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(node.graph.owning_module.get_submodule(str(node.target))).__name__} {node.target!r}"
    return f"{getattr(node.target, '__name__', node.target)} {node.name!r}"


def _foldable(p: _RawPlace) -> bool:
    m = p.params[0][0] if p.params else None
    if p.kind == "linear" and isinstance(m, nn.Linear):
        return True
    if p.kind == "conv" and isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1 and not m.transposed:
        pad = m.padding
        return pad == "valid" or (not isinstance(pad, str) and all(x == 0 for x in pad))
    return False


# ----------------------------------------------------------------------------------------- edits
def _set_tensor(owner: nn.Module, name: str, new: torch.Tensor) -> None:
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(new.contiguous(), requires_grad=old.requires_grad))
    elif name in owner._buffers:
        owner._buffers[name] = new.contiguous()
    else:
        setattr(owner, name, new.contiguous())


class _Editor:
    def __init__(self, cg: ChannelGraph, removed: np.ndarray, decider: _Decider):
        self.cg, self.removed, self.d = cg, removed, decider
        self.gm = cg.gm
        self.chan = cg.chan_of_elem
        self.scaled: list[str] = []

    def kept_line(self, ids: np.ndarray) -> np.ndarray:
        return ~self.removed[self.chan[ids]]

    def kept_axes(self, lay: np.ndarray) -> list[np.ndarray | None]:
        kept = self.kept_line(lay)
        return [kept.any(axis=tuple(d for d in range(lay.ndim) if d != k)) if lay.shape[k] > 1 else None
                for k in range(lay.ndim)]

    def run(self) -> None:
        self.chains()
        self.folds()
        self.params()
        self.masks()
        self.rewrites()

    def chains(self) -> None:
        for start, end, dim in self.d.chains:
            s_lay, e_lay = self.cg.layouts[start], self.cg.layouts[end]
            s_line, e_line = s_lay.reshape(-1), e_lay.reshape(-1)
            if self.kept_line(s_line).all():
                continue
            s_kept = s_line[self.kept_line(s_line)]
            where = {int(e): i for i, e in enumerate(s_kept)}
            idx = torch.tensor([where[int(e)] for e in e_line if int(e) in where], dtype=torch.long)
            name = unique_name(self.gm, f"{end.name}_order")
            self.gm.register_buffer(name, idx)
            with self.gm.graph.inserting_before(end):
                ga = self.gm.graph.get_attr(name)
            with self.gm.graph.inserting_after(end):
                sel = self.gm.graph.call_function(torch.index_select, (start, dim, ga))
            end.replace_all_uses_with(sel)
            sel.meta.update(end.meta)
            self.cg.layouts[sel] = e_lay

    def folds(self) -> None:
        """A removed channel that holds a constant c: its reader adds W[:, c] * c to its bias."""
        for p in self.cg.places:
            if p.role != "reader" or p.values is None or not _foldable(p):
                continue
            gone = ~self.kept_line(p.ids)
            c = np.where(gone, p.values, 0.0)
            c = np.nan_to_num(c)
            if not (gone.any() and (c != 0).any()):
                continue
            m = p.params[0][0]
            w = m.weight.detach().double()
            if isinstance(m, nn.Linear):
                add = w @ torch.as_tensor(c)
            else:
                add = w.sum(dim=tuple(range(2, w.dim()))) @ torch.as_tensor(c)
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=m.weight.dtype), requires_grad=True)
            _set_tensor(m, "bias", m.bias.detach() + add.to(m.bias.dtype))

    def params(self) -> None:
        done: dict[tuple, np.ndarray] = {}
        edits = []
        for p in self.cg.places:
            if p.role == "mask":
                continue
            kept = self.kept_line(p.ids)
            if kept.all():
                continue
            for owner, name, dim in p.params:
                key = (id(owner), name, dim)
                if key in done:
                    if not np.array_equal(done[key], kept):
                        raise SurgeryError(f"Shrink: places of {name!r} on {_who(p.node)} disagree on which "
                                           "channels to keep (a shared parameter read in two layouts)")
                    continue
                done[key] = kept
                t = getattr(owner, name)
                if t is None:
                    continue
                idx = torch.as_tensor(np.nonzero(kept)[0], dtype=torch.long)
                if t.shape[dim] != len(kept):
                    raise SurgeryError(f"Shrink: {name!r} of {_who(p.node)} has {t.shape[dim]} entries on axis "
                                       f"{dim}, the layout has {len(kept)}")
                _set_tensor(owner, name, t.detach().index_select(dim, idx))
            for owner, attr in p.attrs:
                setattr(owner, attr, int(kept.sum()))
            if p.edit is not None:
                edits.append((p.edit, kept))
        for edit, kept in edits:
            edit(kept)

    def masks(self) -> None:
        g = self.gm.graph
        for node in list(self.cg.mask_nodes):
            m = self.gm.get_submodule(str(node.target))
            inp = node.args[0]
            f = m.factors().detach()
            lay = self.cg.layouts.get(inp)
            nd = len(node.meta["shape"])
            dim = m.dim % nd
            if isinstance(lay, np.ndarray) and lay.shape[dim] == len(f):
                f = f[torch.as_tensor(self.kept_line(lay.reshape(-1)))]
            if bool((f == 1).all()):
                node.replace_all_uses_with(inp)
                g.erase_node(node)
                continue
            if self._fold_back(inp, node, f, dim):
                node.replace_all_uses_with(inp)
                g.erase_node(node)
                continue
            shape = [1] * nd
            shape[dim] = len(f)
            name = unique_name(self.gm, f"{node.target}_scale")
            self.gm.register_buffer(name, f.reshape(shape).to(torch.float32).clone())
            with g.inserting_before(node):
                ga = g.get_attr(name)
                mul = g.call_function(torch.mul, (inp, ga))
            mul.meta.update(node.meta)
            node.replace_all_uses_with(mul)
            g.erase_node(node)
            self.scaled.append(str(node.target))

    def _fold_back(self, n: Any, user: fx.Node, f: torch.Tensor, dim: int) -> bool:
        """Scale the layer that makes `n` instead of keeping the mask as a multiplication."""
        if not isinstance(n, fx.Node) or n.op != "call_module" or len(n.users) != 1:
            return False
        if sum(1 for x in self.gm.graph.nodes if x.op == "call_module" and x.target == n.target) != 1:
            return False  # a module called twice cannot be scaled for one of its calls
        m = self.gm.get_submodule(str(n.target))
        nd = len(n.meta["shape"])
        if isinstance(m, (nn.ReLU, nn.LeakyReLU)) and bool((f > 0).all()):
            return self._fold_back(n.args[0], n, f, dim)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and dim == 1 and m.affine and len(f) == m.num_features:
            _set_tensor(m, "weight", m.weight.detach() * f.to(m.weight.dtype))
            _set_tensor(m, "bias", m.bias.detach() * f.to(m.bias.dtype))
            return True
        if isinstance(m, nn.Linear) and dim == nd - 1 and len(f) == m.out_features or \
                isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and dim == 1 and len(f) == m.out_channels:
            shape = [-1] + [1] * (m.weight.dim() - 1)
            _set_tensor(m, "weight", m.weight.detach() * f.to(m.weight.dtype).reshape(shape))
            if m.bias is not None:
                _set_tensor(m, "bias", m.bias.detach() * f.to(m.bias.dtype))
            return True
        return False

    def rewrites(self) -> None:
        for node in list(self.cg.rewrite):
            if node.graph is not self.gm.graph or node not in self.cg.layouts and node.op != "call_function":
                continue
            try:
                self._rewrite(node)
            except _Skip:
                pass

    def _new_shape(self, node: fx.Node) -> list[int] | None:
        lay = self.cg.layouts.get(node)
        shape = node.meta.get("shape")
        if not isinstance(lay, np.ndarray) or not isinstance(shape, torch.Size):
            return None
        axes = self.kept_axes(lay)
        return [int(a.sum()) if a is not None else s for a, s in zip(axes, shape)]

    def _rewrite(self, node: fx.Node) -> None:
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if name in ("view", "reshape", "expand"):
            new = self._new_shape(node)
            old = list(node.meta["shape"])
            if new is None or new == old:
                return
            packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
            sizes = list(node.args[1] if packed else node.args[1:])
            if len(sizes) != len(new):
                raise SurgeryError(f"Shrink: cannot rewrite the sizes of {node.name!r}")
            for d, (o, n_) in enumerate(zip(old, new)):
                if o != n_ and sizes[d] != -1:
                    sizes[d] = n_
            node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)
        elif name == "getitem":
            src = self.cg.layouts.get(node.args[0])
            if not isinstance(src, np.ndarray):
                return
            axes = self.kept_axes(src)
            items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            out, d = [], 0
            for i in _expand_index(items, src.ndim) if any(x is Ellipsis for x in items) else items:
                if i is None:
                    out.append(i)
                    continue
                a = axes[d] if d < len(axes) else None
                if a is not None and isinstance(i, slice):
                    start, stop, _ = i.indices(len(a))
                    ns = int(a[:start].sum())
                    out.append(slice(ns, ns + int(a[start:stop].sum())))
                elif a is not None and isinstance(i, int):
                    out.append(int(a[:i % len(a)].sum()))
                else:
                    out.append(i)
                d += 1
            node.args = (node.args[0], tuple(out) if isinstance(node.args[1], tuple) else out[0])
        elif name in ("split", "chunk"):
            lay = self.cg.layouts.get(node.args[0])
            parts = self.cg.layouts.get(node)
            if not isinstance(lay, np.ndarray) or not isinstance(parts, tuple):
                return
            dim = [d for d in range(lay.ndim) if parts[0].shape[d] != lay.shape[d] or lay.shape[d] > 1]
            shapes = node.meta["shape"]
            dimk = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % lay.ndim
            axes = self.kept_axes(lay)
            a = axes[dimk]
            if a is None:
                return
            cuts = np.cumsum([0] + [s[dimk] for s in shapes])
            sizes = [int(a[cuts[i]:cuts[i + 1]].sum()) for i in range(len(shapes))]
            node.op, node.target = "call_function", torch.split
            node.args, node.kwargs = (node.args[0], sizes, dimk), {}
            del dim
        elif name in ("cat", "concat", "stack", "flatten", "unbind"):
            return


class _Skip(Exception):
    pass


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
def _first_difference(a: fx.GraphModule, b: fx.GraphModule, inputs: tuple, tol: float) -> str | None:
    ra, rb = _Recorder(a), _Recorder(b)
    for m in (a, b):
        m.eval()
    ra.run(*inputs)
    rb.run(*inputs)
    for n in b.graph.nodes:
        x, y = ra.out.get(n.name), rb.out.get(n.name)
        if x is not None and y is not None and x.shape == y.shape and x.is_floating_point():
            if max_rel_diff(x, y) > tol:
                return n.name
    return None


def shrink(gm: fx.GraphModule, example_inputs: Any, tol: float = 1e-4) -> fx.GraphModule:
    """A physically smaller copy of `gm` that computes what `gm` (with its masks) computes.

    `gm` is never mutated. Raises :class:`ShrinkMismatch` if the shrunk model's outputs differ
    from the masked model's on `example_inputs` by more than `tol` (relative to the output's
    largest magnitude).
    """
    inputs = as_inputs(example_inputs)
    if inputs is None:
        raise SurgeryError("Shrink needs example_inputs: pass them to compress(..., example_inputs=(x,))")
    if not isinstance(gm, fx.GraphModule):
        raise SurgeryError(f"Shrink needs a captured GraphModule, got {type(gm).__name__}")
    # copy the modules and the graph, share the tensors: every edit below makes new tensors,
    # and whatever is still shared at the end is cloned (cheaper than deep-copying them all)
    shared = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    work = copy.deepcopy(gm, memo=dict(shared))
    ref = ShapeProp(work).propagate(*inputs)  # fresh shapes, and the masked model's output
    params_before = _n_params(gm)
    cg = analyze(work)
    decider = _Decider(cg)
    removed = decider.run()
    editor = _Editor(cg, removed, decider)
    with torch.no_grad():
        editor.run()
    work.graph.eliminate_dead_code()
    finish(work)
    _unshare(work, shared)
    try:
        out = ShapeProp(work).propagate(*inputs)
        err = max_rel_diff(ref, out)
    except Exception as e:
        raise ShrinkMismatch(float("inf"), None, f"the shrunk model fails to run: {type(e).__name__}: {e}") from e
    if not err <= tol:
        first = _first_difference(gm, work, inputs, tol)
        raise ShrinkMismatch(err, first, "please report this model; Shrink must be exact")
    report = _report(cg, decider, removed, params_before, _n_params(work), err, editor.scaled)
    surgery_meta(work)["shrink_report"] = report
    return work


def _unshare(work: nn.Module, shared: dict[int, torch.Tensor]) -> None:
    """Clone the tensors the shrunk model still shares with the masked one."""
    for m in work.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and id(p) in shared:
                m._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None and id(b) in shared:
                m._buffers[name] = b.clone()


def _report(cg, decider, removed, before, after, err, scaled) -> ShrinkReport:
    rows = []
    for g in cg.groups:
        rows.append(GroupShrink(g.id, [p.node.name for p in g.producers], g.size, g.size, {}, g.frozen))
    chan_group = cg.chan_group
    for c in np.nonzero(removed)[0]:
        rows[chan_group[c]].after -= 1
    for c, r in decider.reason.items():
        if decider.candidate[c]:
            rows[chan_group[c]].kept[int(cg.local_index[c])] = r
    return ShrinkReport(rows, before, after, err, scaled)
