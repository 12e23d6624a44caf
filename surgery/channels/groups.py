"""Channel groups: which channels of which tensors are coupled, found in one walk of the graph.

Every tensor that carries channels gets a *layout*: an int array broadcastable to the tensor's
shape that names, for every entry, the channel *element* it belongs to (size-1 axes are the
axes the channels do not vary along). Producers (Conv/Linear out-channels) create fresh
elements; channel-local ops (BN, activations, pooling, element-wise ops, masks) pass layouts on;
``cat``/``split``/``flatten``/``view``/``transpose`` rearrange them; readers (Conv/Linear
in-channels) consume them. Element-wise ops between two tracked tensors couple their elements
position by position. A channel of a group is a set of coupled elements; a group is every
channel reachable through shared producers and couplings.

How each op moves channels lives in a public rule table (:data:`RULES`), extendable for custom
ops with :func:`register_rule`. An op without a rule freezes the groups of its inputs (never
pruned, reported by name), it never crashes the analysis.

Example::

    >>> import torch, surgery
    >>> from torch import nn
    >>> from surgery.channels import channel_groups
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> gm = surgery.capture(net, (torch.randn(1, 3, 16, 16),))
    >>> [(g.size, g.frozen is None) for g in channel_groups(gm)]
    [(8, True), (4, False)]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch.fx as fx
from torch import nn

from ..copying import gc_paused, tensor_key
from ..errors import SurgeryError
from ..nested import output_items
from ..pipeline import UnitMask
from .boundary import Boundary, check_boundary, handed_leaves, seed
from .checks import check_sizes
from .held import check_tensor_uses
from .components import components
from .points import MaskPoint, mask_points
from .rulebook import NO_CHANNELS, RULES, Ids, Rule, RuleContext, _RawPlace, load_pending, varying
from .rules.modules import mask_rule, table_rule  # importing .rules registers the standard table

__all__ = ["ChannelGroup", "Place", "ChannelGraph", "group_of", "analyze"]


@dataclass(eq=False)
class Place:
    """Where a group's channels live at one op.

    ``role`` is "producer" (the op creates the channels on its output), "local" (the op keeps
    them channel by channel), "shift" (a local op with nothing of ours to cut that maps a zero
    channel to a constant: a Linear with a bias over the tokens) or "reader" (the op mixes them,
    reading its input ``arg``).
    ``dim`` is the axis of that tensor, ``channels[p]`` the group channel at position ``p`` along
    it (-1 where the position belongs to another group).
    """

    node: fx.Node
    role: str
    dim: int
    channels: np.ndarray
    arg: int | None = None
    params: list = field(default_factory=list)  # (owner module, tensor name, axis of the channels)
    graph: str = ""  # the qualified path of the node's graph (see ChannelGroup.graph)

    def __repr__(self) -> str:
        return f"Place({self.node.name}, {self.role}, dim={self.dim}, n={len(self.channels)})"


@dataclass(eq=False)
class ChannelGroup:
    """A set of coupled channels: removing channel j removes it from every place listed.

    ``graph`` is the qualified module path of the GraphModule whose nodes the places are: "" for
    the captured graph itself, e.g. "model.backbone" for a graph nested under an eager shell. A
    group that eager code hands from graph to graph (a backbone's features, read by a head) has
    places in several: ``graph`` is its first place's, and each place names its own.
    """

    id: int
    size: int
    producers: list[Place] = field(default_factory=list)
    locals: list[Place] = field(default_factory=list)
    readers: list[Place] = field(default_factory=list)
    frozen: str | None = None
    masks: list[Place] = field(default_factory=list)
    graph: str = ""
    points: list[Place] = field(default_factory=list)  # where rules say one mask fits (attention heads)
    shifts: list[Place] = field(default_factory=list)  # channel-local ops that map zero to a constant: masks after

    def mask_points(self) -> list[MaskPoint]:
        """Where one shared per-channel mask of ``size`` units realises this group: (node, dim,
        start) calls (see :func:`surgery.channels.points.mask_points`)."""
        return mask_points(self)

    def places(self) -> list[Place]:
        return [*self.producers, *self.locals, *self.readers]

    def __repr__(self) -> str:
        names = ", ".join(p.node.name for p in self.producers[:4]) + ("..." if len(self.producers) > 4 else "")
        fz = f", frozen={self.frozen!r}" if self.frozen else ""
        where = f", graph={self.graph!r}" if self.graph else ""
        return (f"ChannelGroup(id={self.id}, size={self.size}{where}, producers=[{names}], "
                f"readers={len(self.readers)}{fz})")


def group_of(groups: Iterable[ChannelGroup], node: fx.Node) -> list[ChannelGroup]:
    """The groups that have a place at `node` (as producer, local op, reader or mask)."""
    return [g for g in groups if any(p.node is node for p in (*g.places(), *g.masks))]


# ----------------------------------------------------------------------------------------- analysis
class ChannelGraph:
    """The result of the walk over one graph: layouts per node, places, couplings, frozen
    elements, and the groups built from them. :func:`analyze` makes one, :func:`analyze_tree` one
    per graph of a model; Shrink and ChannelPrune read them.

    `boundary` is set for a graph that eager code calls (see :mod:`~surgery.channels.boundary`);
    its groups are numbered from `first_id`, so that ids stay unique across a model's graphs.
    `linked` are further nested graphs, with their boundaries, that eager code hands tensors of
    this one (or of each other) to, unchanged: they are walked as one, in order, and their
    channels form joint groups. ``parts`` lists every (graph, boundary).
    """

    def __init__(self, gm: fx.GraphModule, boundary: Boundary | None = None, first_id: int = 0,
                 linked: Sequence[tuple[fx.GraphModule, Boundary]] = ()):
        self.gm = gm
        self.boundary = boundary
        self.parts: list[tuple[fx.GraphModule, Boundary | None]] = [(gm, boundary), *linked]
        self.path = boundary.path if boundary is not None else ""
        self.part_paths = {id(g.graph): b.path if b is not None else "" for g, b in self.parts}
        self.first_id = first_id
        self.layouts: dict[fx.Node, Any] = {}
        self.values: dict[fx.Node, Any] = {}
        self.places: list[_RawPlace] = []
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.frozen: list[tuple[np.ndarray, str]] = []
        self.space_start: list[int] = []
        self.space_node: list[fx.Node] = []
        self.n = 0
        self.size_nodes: list[tuple[fx.Node, fx.Node]] = []   # (size/shape node, tensor node)
        self.mask_nodes: list[fx.Node] = []
        self.rewrite: set[fx.Node] = set()   # nodes whose literal size arguments follow channels
        self.fixed: list[tuple[np.ndarray, int, str]] = []  # (layout, axis, reason): see RuleContext.fix_axis
        self.decoupled: list[tuple[fx.Node, int]] = []  # (reshape, argument) Shrink sizes itself: checks.size_uses
        self.handed: dict[tuple[str, int], np.ndarray] = {}  # (path, output leaf) -> layout, handed to a graph of ours

    def new_elements(self, size: int, node: fx.Node) -> int:
        start = self.n
        self.space_start.append(start)
        self.space_node.append(node)
        self.n += size
        return start

    def run(self) -> "ChannelGraph":
        load_pending()  # rules for library functions (torchvision's) once the library is loaded
        for self.gm, self.boundary in self.parts:  # rules see the graph being walked
            self._walk()
        self.gm, self.boundary = self.parts[0]
        check_boundary(self)
        check_sizes(self)
        check_tensor_uses(self)
        self._build()
        return self

    def part_path(self, node: fx.Node) -> str:
        """The qualified path of `node`'s graph."""
        return self.part_paths.get(id(node.graph), self.path)

    def _walk(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                seed(self, node)
                continue
            if node.op == "get_attr":
                if node.users and str(node.target).endswith(".weight"):  # an Embedding's table, read whole?
                    out = table_rule(RuleContext(self, node))
                    if out is not None:
                        self.layouts[node] = out
                continue
            if node.op == "output":
                _freeze_output(self, node)
                continue
            if node.op != "placeholder" and "shape" not in node.meta:
                raise SurgeryError(f"channel analysis needs node shapes but node {node.name!r} has none: "
                                   "capture the model with example_inputs (surgery.capture(model, (x,)))")
            ctx = RuleContext(self, node)
            if "inplace" in node.meta:  # an in-place op capture could not rewrite exactly
                ctx.freeze_inputs(node.meta["inplace"])
                continue
            seen = (len(self.places), len(self.frozen))
            if ctx.module is not None and isinstance(ctx.module, UnitMask):
                out = mask_rule(ctx)
            else:
                rule = find_rule(node, ctx.module)
                if rule is None:
                    if any(self._tracked(a) for a in node.all_input_nodes):
                        ctx.freeze_inputs(f"{ctx.describe()} has no channel rule")
                    continue
                try:
                    out = rule(ctx)
                except SurgeryError:
                    raise
                except Exception as e:  # a rule that trips on an odd call must not crash the analysis
                    ctx.freeze_inputs(f"{ctx.describe()}: channel rule failed ({type(e).__name__}: {e})")
                    out = None
            if out is NO_CHANNELS:
                continue
            if isinstance(out, tuple) and len(out) == 2 and (out[0] is None or isinstance(out[0], (np.ndarray, tuple))):
                out, vals = out
            else:
                vals = None
            if out is None and node.meta.get("shape") is not None and (len(self.places), len(self.frozen)) == seen \
                    and any(self._tracked(a) for a in node.all_input_nodes):
                # a tensor came out untracked although tracked channels went in, and the rule
                # recorded no reader: whatever it did with them is unknown, so they must stay
                ctx.freeze_inputs(f"{ctx.describe()}: its channel rule lost track of the channels")
            if out is not None:
                self.layouts[node] = out
                if vals is not None:
                    self.values[node] = vals

    def _tracked(self, a: fx.Node) -> bool:
        return self.layouts.get(a) is not None

    def _build(self) -> None:
        n = self.n
        # one parameter sliced at several places (a module called twice, a weight tied to
        # another module's) is one decision
        first_place: dict[tuple, np.ndarray] = {}
        for p in self.places:
            for owner, name, dim in p.params:
                key = (tensor_key(owner, name), dim)
                if key in first_place and len(first_place[key]) == len(p.ids):
                    self.edges.append((first_place[key], p.ids))
                first_place.setdefault(key, p.ids)
        if self.edges:
            a = np.concatenate([e[0] for e in self.edges])
            b = np.concatenate([e[1] for e in self.edges])
        else:
            a = b = np.zeros(0, dtype=np.int64)
        chan = components(n, a, b)
        self.chan_of_elem = chan            # element -> global channel id
        for lay, axis, reason in self.fixed:  # channels along a fixed axis and nothing else cannot go
            c = chan[lay]
            if all((c == np.take(c, [0], axis=d)).all() for d in varying(c) if d != axis):
                self.frozen.append((np.unique(lay), reason))
        chains: set = set()
        self.places = [p for p in self.places if p.role != "point" or p.arg not in chains and
                       self._one_per_position(p) and not chains.add(p.arg)]
        # groups: channels joined also through the spaces they were produced in
        space = np.zeros(n, dtype=np.int64)
        starts = np.array(self.space_start, dtype=np.int64)
        if n:
            space[starts[1:]] = 1
            space = np.cumsum(space)
        first = starts[space] if n else space
        grp = components(n, np.concatenate([a, np.arange(n)]), np.concatenate([b, first]))
        self.group_of_elem = grp
        n_chan = int(chan.max()) + 1 if n else 0
        self.group_of_chan = np.zeros(n_chan, dtype=np.int64)
        self.group_of_chan[chan] = grp
        frozen_chan: dict[int, str] = {}
        if self.frozen:  # the first reason recorded for a channel is the one reported
            elems = np.concatenate([e for e, _ in self.frozen])
            which = np.concatenate([np.full(len(e), i) for i, (e, _) in enumerate(self.frozen)])
            chans, first = np.unique(chan[elems], return_index=True)
            reasons = [r for _, r in self.frozen]
            frozen_chan = dict(zip(chans.tolist(), [reasons[i] for i in which[first].tolist()]))
        self.frozen_chan = frozen_chan
        # groups are numbered by first appearance, and so are the channels within each group
        _, first_elem = np.unique(chan, return_index=True)    # channel -> its first element
        by_first = np.argsort(first_elem, kind="stable")      # channels in order of appearance
        keys, key_first = np.unique(grp[first_elem[by_first]], return_index=True)
        gid = np.empty(len(keys), dtype=np.int64)
        gid[np.argsort(key_first, kind="stable")] = np.arange(len(keys))
        g_sorted = gid[np.searchsorted(keys, grp[first_elem[by_first]])]
        sizes = np.bincount(g_sorted, minlength=len(keys))
        in_group = np.argsort(g_sorted, kind="stable")        # grouped, appearance order kept
        self.local_index = np.zeros(n_chan, dtype=np.int64)
        self.local_index[by_first[in_group]] = np.arange(n_chan) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        self.chan_group = np.zeros(n_chan, dtype=np.int64)
        self.chan_group[by_first] = g_sorted
        groups = [ChannelGroup(id=self.first_id + i, size=int(s), graph=self.path) for i, s in enumerate(sizes)]
        if frozen_chan:  # a group's reason: its lowest frozen channel's (a classifier has 1000)
            chans = np.fromiter(frozen_chan, dtype=np.int64, count=len(frozen_chan))
            gids, first = np.unique(self.chan_group[chans], return_index=True)
            for gi, k in zip(gids.tolist(), first.tolist()):
                groups[gi].frozen = frozen_chan[int(chans[k])]
        buckets = {"producer": "producers", "local": "locals", "reader": "readers", "mask": "masks", "point": "points",
                   "shift": "shifts"}
        # every place's channels at once (numpy calls on small arrays cost microseconds each)
        place_sizes = np.fromiter((p.ids.size for p in self.places), dtype=np.int64, count=len(self.places))
        ends = np.cumsum(place_sizes)
        flat = (np.concatenate([p.ids.reshape(-1) for p in self.places]) if self.places
                else np.zeros(0, dtype=np.int64))
        chans_flat = chan[flat]
        group_flat = self.chan_group[chans_flat]
        local_flat = self.local_index[chans_flat]
        one_group = np.zeros(len(self.places), dtype=bool)
        full = place_sizes > 0
        if full.any():
            starts = (ends - place_sizes)[full]
            one_group[full] = np.minimum.reduceat(group_flat, starts) == np.maximum.reduceat(group_flat, starts)
        for i, p in enumerate(self.places):
            lo, hi = ends[i] - place_sizes[i], ends[i]
            local = local_flat[lo:hi].reshape(p.ids.shape)
            if one_group[i]:  # the usual case: the place lies in one group
                gi = group_flat[lo]
                getattr(groups[gi], buckets[p.role]).append(Place(p.node, p.role, p.dim, local, p.arg, p.params,
                                                                  self.part_path(p.node)))
                continue
            cg = group_flat[lo:hi].reshape(p.ids.shape)
            for gi in np.unique(cg):
                place = Place(p.node, p.role, p.dim, np.where(cg == gi, local, -1), p.arg, p.params,
                              self.part_path(p.node))
                getattr(groups[gi], buckets[p.role]).append(place)
        if len(self.parts) > 1:
            for g in groups:
                g.graph = next((p.graph for p in (*g.producers, *g.locals, *g.readers, *g.masks)), g.graph)
        self.groups = groups

    def _one_per_position(self, p: _RawPlace) -> bool:
        """A point's node holds one channel per position along its axis, the same on every other
        axis (a head's elements, coupled by the attention rules, are one channel)."""
        lay = self.layouts.get(p.node)
        if not isinstance(lay, np.ndarray) or lay.shape[p.dim] != len(p.ids):
            return False
        c = self.chan_of_elem[np.moveaxis(lay, p.dim, 0).reshape(len(p.ids), -1)]
        return bool((c == c[:, :1]).all()) and len(np.unique(c[:, 0])) == len(p.ids)

    def channels(self, ids: Ids) -> np.ndarray:
        """Global channel ids of a layout."""
        return self.chan_of_elem[ids]


def find_rule(node: fx.Node, module: nn.Module | None) -> Rule | None:
    """The rule for `node`: a module's class or the nearest base class with one, as long as no
    class on the way defines its own forward (timm's BatchNormAct2d is a BatchNorm2d that also
    runs an activation; a ScaledStdConv2d a Conv2d that standardises its weight: the base's rule
    would be wrong for them); a function's or a method name's entry."""
    if node.op == "call_module":
        for cls in type(module).__mro__:
            if cls in RULES:
                return RULES[cls]
            if "forward" in vars(cls):
                return None
        return None
    if node.op == "call_method":
        return RULES.get(str(node.target))
    if node.op == "call_function":
        try:
            return RULES.get(node.target)
        except TypeError:
            return None
    return None


def _freeze_output(g: ChannelGraph, node: fx.Node) -> None:
    skip = handed_leaves(g, node)  # handed to a graph walked with this one: its readers are seen
    for i, item in enumerate(output_items(node.args[0]) if skip else (node.args[0],)):
        if i in skip:
            g.handed[g.part_path(node), i] = g.layouts[item]
            continue
        for a in _nodes_in(item):
            lay = g.layouts.get(a)
            for part in (lay if isinstance(lay, tuple) else (lay,)):
                if part is not None:
                    why = g.boundary.output_reason(a) if g.boundary else f"reaches the model output through {a.name!r}"
                    g.frozen.append((np.unique(part), why))


def _nodes_in(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return list(dict.fromkeys(found))


@gc_paused()
def analyze(gm: fx.GraphModule) -> ChannelGraph:
    """Walk `gm`'s own graph once and return its channel analysis (layouts, places, groups);
    :func:`analyze_tree` also analyses the graphs nested under eager code in it."""
    if not isinstance(gm, fx.GraphModule):
        raise SurgeryError(f"channel analysis needs a captured GraphModule, got {type(gm).__name__}")
    if not any("shape" in n.meta for n in gm.graph.nodes if n.op != "placeholder"):
        raise SurgeryError("channel analysis needs node shapes: capture with example_inputs "
                           "(surgery.capture(model, (x,)) or compress(..., example_inputs=(x,)))")
    return ChannelGraph(gm).run()
