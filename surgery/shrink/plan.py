"""Shrink's plan: which masked channels can go exactly, and which must stay (with why).

A channel is a candidate when a mask zeroes it. It stays when its group is frozen, when a
reader sees anything but zero in it (or a constant it cannot fold), or when removing it would
break a structure: a tensor that spreads channels over several axes must stay rectangular, a
grouped convolution needs equal channels per group, an integer index must stay valid, no
tensor may lose every channel.
"""
from __future__ import annotations

import operator
from typing import Callable

import numpy as np
import torch.fx as fx
from torch import nn

from ..channels.groups import ChannelGraph
from ..channels.rulebook import _RawPlace, is_reshape, varying
from ..graph import submodule

class Decider:
    def __init__(self, cg: ChannelGraph):
        self.cg = cg
        nc = len(cg.group_of_chan)
        self.chan = cg.chan_of_elem
        self.candidate = np.zeros(nc, dtype=bool)
        self.keep = np.zeros(nc, dtype=bool)
        self.reason: dict[int, str] = {}
        self.chain_inner: set[fx.Node] = set()
        self.chains: list[tuple[fx.Node, fx.Node, int]] = []

    def mark(self, chans: np.ndarray, reason: str | Callable[[], str]) -> bool:
        """Keep `chans` (those that a mask would remove) for `reason` (a string, or a function
        that makes it: only called when some channel is newly kept)."""
        open_ = self.candidate[chans] & ~self.keep[chans]
        if not open_.any():  # the common case: nothing to do, and no sort
            return False
        new = np.unique(chans[open_])
        self.keep[new] = True
        if callable(reason):
            reason = reason()
        for c in new:
            self.reason.setdefault(int(c), reason)
        return True

    def removed(self) -> np.ndarray:
        return self.candidate & ~self.keep

    def run(self) -> np.ndarray:
        cg = self.cg
        for p in cg.places:
            if p.role == "mask":
                m = submodule(p.node.graph.owning_module, str(p.node.target))
                kw = p.node.kwargs  # a call with tile=k holds its units k times over; one with runs, some of them
                f = m.factors_at(len(p.ids), kw.get("tile", 1), kw.get("runs"), kw.get("each", 1)).cpu().numpy()
                self.candidate[self.chan[p.ids[f == 0]]] = True
        frozen: dict[str, list[int]] = {}
        for c, r in cg.frozen_chan.items():
            frozen.setdefault(r, []).append(c)
        for r, chans in frozen.items():
            self.mark(np.array(chans), f"group frozen: {r}")
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
            self.mark(chans[bad], lambda: f"{_who(p.node)} reads {what} in it")

    def _find_chains(self) -> None:
        """view -> transpose -> view channel shuffles: replaced by one index_select, so their
        intermediate layouts need no rectangular structure."""
        cg = self.cg
        for node, lay in cg.layouts.items():
            if not isinstance(lay, np.ndarray) or len(varying(lay)) < 2 or not is_reshape(node):
                continue
            start = node.args[0]
            while is_reshape(start) and isinstance(cg.layouts.get(start), np.ndarray) \
                    and len(varying(cg.layouts[start])) >= 2:
                start = start.args[0]
            end = node
            while len(end.users) == 1 and is_reshape(next(iter(end.users))) \
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
                                             lambda p=p: f"{_who(p.node)} needs the same number of channels in "
                                             f"each of its {p.groups} groups")
        for lay, axis, reason in self.cg.fixed:
            kept = ~removed[self.chan[lay]]
            gone = ~kept.any(axis=tuple(d for d in range(lay.ndim) if d != axis))
            if gone.any() and kept.any():
                changed |= self.mark(self.chan[np.take(lay, np.nonzero(gone)[0], axis=axis)].reshape(-1), reason)
        for node in self.cg.rewrite:
            if node.op == "call_function" and node.target is operator.getitem:
                changed |= self._int_index(node, removed)
        return changed

    def _rect(self, node: fx.Node, lay: np.ndarray, removed: np.ndarray) -> bool:
        vd = varying(lay)
        kept = ~removed[self.chan[lay]]
        if kept.all():
            return False
        if not kept.any():  # one channel alone too (a gate that scales many: see rules.elementwise)
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


def _who(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(submodule(node.graph.owning_module, str(node.target))).__name__} {node.target!r}"
    return f"{getattr(node.target, '__name__', node.target)} {node.name!r}"


def _foldable(p: _RawPlace) -> bool:
    m = p.params[0][0] if p.params else None
    if p.kind == "linear" and isinstance(m, nn.Linear):
        return True
    if p.kind == "conv" and isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1 and not m.transposed:
        pad = m.padding
        return pad == "valid" or (not isinstance(pad, str) and all(x == 0 for x in pad))
    return False


