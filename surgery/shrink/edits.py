"""Shrink's edits: slice parameters, fold constants and mask values, rewrite size arguments,
replace channel shuffles by one index_select."""
from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..channels.groups import ChannelGraph
from ..copying import held_tensor, tensor_key, tied_tensors
from ..errors import SurgeryError
from ..graph import submodule, unique_name
from ..libraries import standardised_conv
from .counts import divide_anew, size_at_run_time
from .cut import select_indices, slice_of_kept
from .plan import Decider, _expand_index, _foldable, _who


def _set_tensor(owner: nn.Module, name: str, new: torch.Tensor) -> None:
    new = new.contiguous()
    old = owner._parameters.get(name)
    if old is not None:  # straight into the tables: nn.Module.__setattr__'s checks cost more than the slice
        owner._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
    elif name in owner._buffers:
        owner._buffers[name] = new
    else:
        setattr(owner, name, new)
    if isinstance(owner, nn.RNNBase):  # its forward reads a cached list of its weights
        owner._init_flat_weights()


class Editor:
    def __init__(self, cg: ChannelGraph, removed: np.ndarray, decider: Decider):
        self.cg, self.removed, self.d = cg, removed, decider
        self.graphs = {gm.graph for gm, _ in cg.parts}  # a group handed between nested graphs edits each
        self.chan = cg.chan_of_elem
        self.scaled: list[str] = []
        self.selected: list[tuple[Any, int, torch.Tensor]] = []  # (tensor key, axis, kept indices): the plan
        # tied tensors: every holder gets the one new tensor; keys fixed before any edit
        self.tied = {k: v for gm, _ in cg.parts for k, v in tied_tensors(gm).items()}
        self.keys = {(id(o), n): tensor_key(o, n) for p in cg.places for o, n, _ in p.params}

    def set_tensor(self, owner: nn.Module, name: str, new: torch.Tensor) -> None:
        """Replace `owner.name` by `new`, in every module that holds the same tensor."""
        old = held_tensor(owner, name)
        holders = self.tied.pop(id(old), None) if old is not None else None
        if not holders:
            _set_tensor(owner, name, new)
            return
        _set_tensor(owner, name, new)
        t = held_tensor(owner, name)
        for _, m, n in holders:
            (m._parameters if n in m._parameters else m._buffers)[n] = t
        self.tied[id(t)] = holders

    def is_tied(self, owner: nn.Module, name: str) -> bool:
        t = held_tensor(owner, name)
        return t is not None and id(t) in self.tied

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
        self.decouple()

    def chains(self) -> None:
        for start, end, dim in self.d.chains:
            s_lay, e_lay = self.cg.layouts[start], self.cg.layouts[end]
            s_line, e_line = s_lay.reshape(-1), e_lay.reshape(-1)
            if self.kept_line(s_line).all():
                continue
            s_kept = s_line[self.kept_line(s_line)]
            where = {int(e): i for i, e in enumerate(s_kept)}
            idx = torch.tensor([where[int(e)] for e in e_line if int(e) in where], dtype=torch.long)
            gm = end.graph.owning_module
            name = unique_name(gm, f"{end.name}_order")
            gm.register_buffer(name, idx)
            with gm.graph.inserting_before(end):
                ga = gm.graph.get_attr(name)
            with gm.graph.inserting_after(end):
                sel = gm.graph.call_function(torch.index_select, (start, dim, ga))
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
            cols = np.nonzero(c)[0]  # only the removed channels that hold a nonzero constant add to the bias
            w = m.weight.detach()[:, torch.as_tensor(cols)].double()
            c = torch.as_tensor(c[cols])
            add = w @ c if isinstance(m, nn.Linear) else w.sum(dim=tuple(range(2, w.dim()))) @ c
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=m.weight.dtype), requires_grad=True)
            self.set_tensor(m, "bias", m.bias.detach() + add.to(m.bias.dtype))

    def params(self) -> None:
        done: dict[tuple, np.ndarray] = {}
        pending: dict[Any, tuple[nn.Module, str, dict[int, torch.Tensor]]] = {}  # tensor key -> its selections
        edits = []
        for p in self.cg.places:
            if p.role == "mask":
                continue
            kept = self.kept_line(p.ids)
            if kept.all():
                continue
            idx = None
            for owner, name, dim in p.params:
                key = (self.keys[(id(owner), name)], dim)
                if key in done:
                    if not np.array_equal(done[key], kept):
                        raise SurgeryError(f"Shrink: places of {name!r} on {_who(p.node)} disagree on which "
                                           "channels to keep (a shared parameter read in two layouts)")
                    continue
                done[key] = kept
                t = getattr(owner, name)
                if t is None:
                    continue
                if idx is None:
                    idx = torch.as_tensor(np.nonzero(kept)[0], dtype=torch.long)
                if t.shape[dim] != len(kept):
                    raise SurgeryError(f"Shrink: {name!r} of {_who(p.node)} has {t.shape[dim]} entries on axis "
                                       f"{dim}, the layout has {len(kept)}")
                pending.setdefault(key[0], (owner, name, {}))[2][dim] = idx
            for owner, attr in p.attrs:
                setattr(owner, attr, int(kept.sum()))
            if p.edit is not None:
                edits.append((p.edit, kept))
        for key, (owner, name, picks) in pending.items():
            self.set_tensor(owner, name, select_indices(getattr(owner, name).detach(), picks))
            self.selected.extend((key, dim, idx) for dim, idx in picks.items())
        for edit, kept in edits:
            edit(kept)

    def masks(self) -> None:
        for node in list(self.cg.mask_nodes):
            g = (gm := node.graph.owning_module).graph
            m = submodule(gm, str(node.target))
            inp = node.args[0]
            lay = self.cg.layouts.get(inp)
            nd = len(node.meta["shape"])
            dim = node.kwargs.get("dim", m.dim) % nd
            runs = node.kwargs.get("runs")  # some of the units only: their factors, as one mask of them
            f = m.factors_at(node.meta["shape"][dim], runs=runs)
            tile, each = node.kwargs.get("tile", 1), node.kwargs.get("each", 1)
            copies = max(tile, each)
            if isinstance(lay, np.ndarray) and lay.shape[dim] == len(f) * copies:
                # one channel per position along dim (a head's channel is constant along its other axes)
                line = np.moveaxis(lay, dim, 0).reshape(len(f) * copies, -1)[:, 0]
                kept = self.kept_line(line[::each] if each > 1 else line[:len(f)])
                if not kept.all():
                    f = f.index_select(0, torch.from_numpy(np.flatnonzero(kept)).to(f.device))
            f = m.spread(f, tile, None, each)  # the units' copies alike
            if bool((f == 1).all()) or self._fold_back(inp, node, f, dim) or self._fold_forward(node, f, dim, nd):
                node.replace_all_uses_with(inp)
                g.erase_node(node)
                continue
            shape = [1] * nd
            shape[dim] = len(f)
            name = unique_name(gm, f"{node.target}_scale")
            gm.register_buffer(name, f.reshape(shape).to(torch.float32).clone())
            with g.inserting_before(node):
                ga = g.get_attr(name)
                mul = g.call_function(torch.mul, (inp, ga))
            mul.meta.update(node.meta)
            if node in self.cg.layouts:  # a mask after this one finds its input's channels here
                self.cg.layouts[mul] = self.cg.layouts[node]
            node.replace_all_uses_with(mul)
            g.erase_node(node)
            self.scaled.append(str(node.target))

    def _fold_forward(self, node: fx.Node, f: torch.Tensor, dim: int, nd: int) -> bool:
        """Scale the input channels of the convolutions/Linears that read the mask directly
        (exact for any factor: those layers are linear in their input, zero padding included)."""
        users = list(node.users)
        if len(users) == 1 and dim == 1 and _is_flatten(users[0]) and len(users[0].users) == 1:
            # mask -> flatten -> Linear: channel j becomes features j*HW ... (j+1)*HW - 1
            hw = int(np.prod(node.meta["shape"][2:]))
            node, users, f, dim, nd = users[0], list(users[0].users), f.repeat_interleave(hw), 1, 2
        mods = []
        gm = node.graph.owning_module
        for u in users:
            if u.op != "call_module" or u.args[0] is not node or len(u.args) != 1 or u.kwargs or \
                    len(gm.graph.find_nodes(op="call_module", target=u.target)) != 1:
                return False
            m = submodule(gm, str(u.target))
            if self.is_tied(m, "weight") or standardised_conv(m):
                return False  # scaling it would scale its other holders' use too, or be standardised away
            if isinstance(m, nn.Linear) and dim == nd - 1 and m.in_features == len(f):
                mods.append(m)
            elif isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and dim == 1 and \
                    m.in_channels == len(f):
                mods.append(m)
            else:
                return False
        if not mods:
            return False
        for m in mods:
            w = m.weight.detach()
            if isinstance(m, nn.Linear):
                scale = f.to(w.dtype).reshape(1, -1)
            else:  # input channel j of group g feeds the group's outputs through weight[:, j % per_group]
                per_in, per_out = w.shape[1], w.shape[0] // m.groups
                idx = (torch.arange(w.shape[0]) // per_out).reshape(-1, 1) * per_in + torch.arange(per_in)
                scale = f.to(w.dtype)[idx].reshape(w.shape[0], per_in, *[1] * (w.dim() - 2))
            _set_tensor(m, "weight", w * scale)
        return True

    def _fold_back(self, n: Any, user: fx.Node, f: torch.Tensor, dim: int) -> bool:
        """Scale the layer that makes `n` instead of keeping the mask as a multiplication."""
        if not isinstance(n, fx.Node) or n.op != "call_module" or len(n.users) != 1:
            return False
        if len(n.graph.find_nodes(op="call_module", target=n.target)) != 1:
            return False  # a module called twice cannot be scaled for one of its calls
        m = submodule(n.graph.owning_module, str(n.target))
        if self.is_tied(m, "weight") or self.is_tied(m, "bias"):
            return False  # scaling it would scale its other holders' use too
        nd = len(n.meta["shape"])
        if isinstance(m, (nn.ReLU, nn.LeakyReLU)) and bool((f > 0).all()):
            return self._fold_back(n.args[0], n, f, dim)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and dim == 1 and m.affine and len(f) == m.num_features \
                and type(m).forward.__module__.startswith("torch.nn"):  # timm's BatchNormAct2d: an act follows
            _set_tensor(m, "weight", m.weight.detach() * f.to(m.weight.dtype))
            _set_tensor(m, "bias", m.bias.detach() * f.to(m.bias.dtype))
            return True
        if standardised_conv(m):  # its filters are standardised: only a ScaledStdConv2d's gain scales them
            if getattr(m, "gain", None) is None or dim != 1 or len(f) != m.out_channels or self.is_tied(m, "gain"):
                return False
            _set_tensor(m, "gain", m.gain.detach() * f.to(m.gain.dtype).reshape(-1, 1, 1, 1))
            if m.bias is not None:
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
            if node.graph not in self.graphs or node not in self.cg.layouts and node.op != "call_function":
                continue
            try:
                self._rewrite(node)
            except _Skip:
                pass

    def decouple(self) -> None:
        """A reshape sized by a count read from another tensor (checks.size_uses): that argument
        becomes the axis' own new size, read at run time where it can be (counts.size_at_run_time),
        so the other tensor's width no longer decides it."""
        for node, j in self.cg.decoupled:
            if node.graph not in self.graphs:
                continue
            new = self._new_shape(node) or list(node.meta["shape"])
            packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
            sizes = list(node.args[1] if packed else node.args[1:])
            if j >= len(sizes) or len(sizes) != len(new) or not isinstance(sizes[j], fx.Node):
                continue
            count = sizes[j]
            if node.target != "repeat":
                sizes[j] = size_at_run_time(node, count, int(new[j]), -1 not in sizes, self._new_shape)
            else:  # a count of copies, not a size (DeBERTa's size(0) // heads): out / in
                sizes[j] = int(new[j])
                source = node.args[0]
                have = self._new_shape(source) or list(source.meta["shape"])
                k = j - (len(sizes) - len(have))  # repeat's counts align with the input's last axes
                if k >= 0 and sizes[j] % have[k]:
                    raise SurgeryError(f"Shrink: {node.name!r} cannot repeat {have[k]} rows into {sizes[j]}")
                sizes[j] //= have[k] if k >= 0 else 1
                if divide_anew(count, sizes[j], self._new_shape):
                    continue  # still read at run time: other batch sizes repeat as they did
            node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)

    def _rewrite_shape_tail(self, node: fx.Node, shape: fx.Node) -> None:
        """``shape`` is ``sizes + (a, b)``, read by `node` alone: put the new sizes in (a, b)."""
        new = self._new_shape(node)
        old = list(node.meta["shape"])
        if new is None or new == old:
            return
        literal = shape.args[1] if shape.op == "call_function" and shape.target is operator.add and \
            len(shape.args) == 2 and isinstance(shape.args[1], tuple) else None
        if literal is None:
            return  # read whole at run time (the verification runs would tell otherwise)
        k = len(literal)
        if len(shape.users) != 1 or any(o != n for o, n in zip(old[:-k], new[:-k])):
            raise SurgeryError(f"Shrink: cannot rewrite the sizes of {node.name!r} (made by {shape.name!r})")
        tail = [n if o != n and s != -1 else s for s, o, n in zip(literal, old[-k:], new[-k:])]
        shape.args = (shape.args[0], tuple(tail))

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
            if len(node.args) == 2 and isinstance(node.args[1], fx.Node):
                # one shape made at run time: x.view(y.shape) reads the shrunk sizes itself;
                # x.view(y.size()[:-1] + (heads, head_dim)) needs its literal tail rewritten
                self._rewrite_shape_tail(node, node.args[1])
                return
            packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
            sizes = list(node.args[1] if packed else node.args[1:])
            if len(sizes) != len(new):
                raise SurgeryError(f"Shrink: cannot rewrite the sizes of {node.name!r}")
            for d, (o, n_) in enumerate(zip(old, new)):
                if o != n_ and sizes[d] != -1:  # a size read at run time stays so (the batch may be in it)
                    sizes[d] = size_at_run_time(node, sizes[d], n_, False, self._new_shape) \
                        if isinstance(sizes[d], fx.Node) else n_
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
                if a is not None and isinstance(i, slice) and a.all():
                    out.append(i)  # nothing leaves this axis: the slice stands (its step too)
                elif a is not None and isinstance(i, slice):
                    out.append(slice_of_kept(i, a, node))
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


def _is_flatten(n: fx.Node) -> bool:
    if n.op == "call_module":
        m = submodule(n.graph.owning_module, str(n.target))
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if n.op in ("call_function", "call_method") and getattr(n.target, "__name__", n.target) == "flatten":
        rest = list(n.args[1:]) + [n.kwargs.get("start_dim", 0 if n.op == "call_function" else 0)]
        return rest[0] == 1 and len(n.args) <= 2 and "end_dim" not in n.kwargs
    return False


class _Skip(Exception):
    pass
