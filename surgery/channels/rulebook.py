"""The rule book of the channel analysis: the rule table, what a rule sees (RuleContext) and
helpers to write rules (passthrough, channel_local, frozen). See surgery.channels.

Example: a custom per-channel scale module, pruned through like BatchNorm::

    >>> from surgery.channels import register_rule, channel_local
    >>> class MyScale(torch.nn.Module):
    ...     def __init__(self, c):
    ...         super().__init__()
    ...         self.weight = torch.nn.Parameter(torch.ones(c))
    ...     def forward(self, x):
    ...         return x * self.weight.view(1, -1, 1, 1)
    >>> _ = register_rule(MyScale, channel_local(params={"weight": 0}, values="apply"))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from ..errors import SurgeryError
from ..graph import submodule

if TYPE_CHECKING:
    from .groups import ChannelGraph

__all__ = ["RULES", "Rule", "NO_CHANNELS", "register_rule", "when_imported", "load_pending", "RuleContext",
           "passthrough", "channel_local", "frozen", "varying", "is_reshape", "Ids"]

Ids = np.ndarray  # int64, broadcastable to the tensor's shape

Rule = Callable[["RuleContext"], Any]
NO_CHANNELS = object()
"""What a rule returns for an op whose output carries none of its inputs' channels by design (it
reads only their shape, dtype or device): the channels stay free. Returning None says instead
that the rule lost track of them, which freezes them unless it recorded a reader."""
RULES: dict[Any, Rule] = {}
"""The rule table: module class, function, or method name (a str) -> rule. A rule receives a
:class:`RuleContext` and returns the output layout, or ``(layout, values)``, or None (the output
carries no tracked channels). A tuple-valued op (split) must return ``(tuple_of_layouts, values)``."""


def register_rule(target: Any, rule: Rule) -> Rule:
    """Teach the channel analysis how `target` moves channels.

    `target` is an ``nn.Module`` subclass (matched through the class hierarchy), a function
    (``torch.add``, ``F.relu``, your own leaf function) or a method name (``"flatten"``).
    `rule` is usually built by a helper, e.g. a custom per-channel scale module::

        register_rule(MyScale, channel_local(params={"weight": 0}))

    or a function ``rule(ctx) -> layout`` using :class:`RuleContext` for anything else.
    """
    RULES[target] = rule
    return rule


_PENDING: list[tuple[str, Callable[[], None]]] = []


def when_imported(module: str, register: Callable[[], None]) -> None:
    """Run `register` (registering rules for a library's functions) once `module` is imported,
    at the start of the next analysis: importing the channel analysis must not import the library
    (torchvision costs seconds), and a graph can only call its functions once it is loaded."""
    _PENDING.append((module, register))


def load_pending() -> None:
    """Register the rules :func:`when_imported` deferred whose library is now imported."""
    import sys
    for item in [item for item in _PENDING if item[0] in sys.modules]:
        _PENDING.remove(item)
        try:
            item[1]()
        except (ImportError, AttributeError):  # an optional library whose layout changed: no rules for it
            pass


@dataclass(eq=False)
class _RawPlace:
    node: fx.Node
    role: str
    dim: int
    ids: np.ndarray            # element per position along dim
    arg: int | None = None
    params: list = field(default_factory=list)   # (owner module, attribute, dim)
    attrs: list = field(default_factory=list)    # (owner module, attribute) set to the kept count
    kind: str = "zero"         # readers: "linear" / "conv" may fold constants; "zero" needs zeros
    groups: int = 1            # grouped convolutions: positions split into equal segments
    edit: Callable | None = None  # custom shrink edit: edit(kept_positions: np.ndarray) -> None
    values: np.ndarray | None = None  # readers: constant value per position (nan = unknown)


class RuleContext:
    """What a rule sees: the node, its module, the layouts of its inputs, and the means to
    record places, couple elements and freeze them."""

    def __init__(self, graph: "ChannelGraph", node: fx.Node):
        self.g = graph
        self.node = node
        self.module: nn.Module | None = (submodule(graph.gm, str(node.target))
                                         if node.op == "call_module" else None)

    # --- reading
    def ids(self, arg: Any) -> Ids | None:
        """The layout of an argument (a node), or None when it carries no tracked channels."""
        return self.g.layouts.get(arg) if isinstance(arg, fx.Node) else None

    def values(self, arg: Any) -> np.ndarray | None:
        """Known per-entry constant values of an argument (nan = unknown)."""
        if not isinstance(arg, fx.Node):
            return None
        return self.g.values.get(arg)

    def shape(self, arg: Any = None) -> torch.Size | None:
        node = self.node if arg is None else arg
        s = node.meta.get("shape") if isinstance(node, fx.Node) else None
        return s if isinstance(s, torch.Size) else None

    @property
    def x(self) -> fx.Node | None:
        """The first argument when it is a node (the tensor input of most ops)."""
        a = self.node.args[0] if self.node.args else None
        return a if isinstance(a, fx.Node) else None

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        if len(self.node.args) > i:
            return self.node.args[i]
        return self.node.kwargs.get(name, default)

    # --- recording
    def new_space(self, dim: int, size: int | None = None, params=(), attrs=(), edit=None, groups=1) -> Ids:
        """Fresh channels on axis `dim` of this node's output (a producer place)."""
        shape = self.shape()
        if shape is None:
            raise SurgeryError(f"node {self.node.name!r} has no shape; capture with example_inputs")
        dim = dim % len(shape)
        size = shape[dim] if size is None else size
        start = self.g.new_elements(size, self.node)
        ids = np.arange(start, start + size, dtype=np.int64)
        self.g.places.append(_RawPlace(self.node, "producer", dim, ids, None, list(params), list(attrs),
                                       groups=groups, edit=edit))
        out = [1] * len(shape)
        out[dim] = size
        return ids.reshape(out)

    def place(self, role: str, ids: Ids, dim: int, arg: int | None = None, params=(), attrs=(),
              kind: str = "zero", groups: int = 1, edit=None, values: np.ndarray | None = None) -> None:
        """Record a local or reader place: the positions along `dim` of a layout `ids`."""
        dim = dim % ids.ndim
        if any(s > 1 for d, s in enumerate(ids.shape) if d != dim):
            # the op treats positions along `dim` as units; channels also varying along other
            # axes (a flattened map read by a per-channel op) cannot be cut out per position
            self.freeze(ids, f"{self.describe()} sees channels along more than axis {dim}")
            return
        line = ids.reshape(-1)
        size = self.shape_at(role, arg, dim)
        if len(line) == 1 and size not in (None, 1):
            line = np.repeat(line, size)
        vline = None
        if values is not None:
            vline = np.broadcast_to(values, ids.shape).reshape(-1)
            if len(vline) == 1 and len(line) > 1:
                vline = np.repeat(vline, len(line))
        self.g.places.append(_RawPlace(self.node, role, dim, line, arg, list(params), list(attrs), kind,
                                       groups, edit, vline))

    def point(self, node: fx.Node, line: Ids, dim: int, chain: int) -> None:
        """Record that one mask over `dim` of `node`'s output could realise the group of `line`
        (one element per position along `dim`): used where no producer carries the group whole,
        e.g. attention heads (see :mod:`.rules.attention`). Of the points recorded with the same
        `chain` number, the walk keeps the first whose node turns out to hold one channel per
        position along `dim` (constant along every other axis)."""
        self.g.places.append(_RawPlace(node, "point", dim, np.asarray(line, dtype=np.int64).reshape(-1), chain))

    def fix_axis(self, ids: Ids, dim: int, reason: str) -> None:
        """Channels of `ids` may leave only in ways that keep every position along `dim` (an
        untracked operand varies along it: rotary tables along a head's dimensions). Shrink keeps
        whatever a removal would take out of that axis, with `reason`."""
        self.g.fixed.append((np.asarray(ids), dim % np.asarray(ids).ndim, reason))

    def shape_at(self, role: str, arg: int | None, dim: int) -> int | None:
        node = self.node if role != "reader" or arg is None else self.node.args[arg]
        s = self.shape(node) if isinstance(node, fx.Node) else None
        return s[dim] if s is not None and dim < len(s) else None

    def couple(self, a: Ids, b: Ids) -> Ids:
        """Position-wise union of two layouts (broadcast); returns the broadcast layout."""
        a, b = _align(a, b)
        a, b = np.broadcast_arrays(a, b)
        diff = a != b
        if diff.any():
            self.g.edges.append((a[diff].ravel().copy(), b[diff].ravel().copy()))
        return np.array(a)

    def freeze(self, ids: Ids | None, reason: str) -> None:
        """Mark every element in `ids` as never removable, with a reason naming the culprit."""
        if ids is not None:
            self.g.frozen.append((np.unique(np.asarray(ids, dtype=np.int64)), reason))

    def freeze_inputs(self, reason: str) -> None:
        for a in self.node.all_input_nodes:
            lay = self.g.layouts.get(a)
            if isinstance(lay, tuple):
                for part in lay:
                    self.freeze(part, reason)
            else:
                self.freeze(lay, reason)

    def describe(self) -> str:
        n = self.node
        if n.op == "call_module":
            return f"{type(self.module).__name__} {n.target!r}"
        name = getattr(n.target, "__name__", str(n.target))
        return f"{name} at node {n.name!r}"


def _align(a: Ids, b: Ids) -> tuple[Ids, Ids]:
    if a.ndim < b.ndim:
        a = a.reshape((1,) * (b.ndim - a.ndim) + a.shape)
    elif b.ndim < a.ndim:
        b = b.reshape((1,) * (a.ndim - b.ndim) + b.shape)
    return a, b


def varying(ids: Ids) -> list[int]:
    """The axes a layout varies along."""
    return [d for d, s in enumerate(ids.shape) if s > 1]


_RESHAPES = frozenset({"view", "reshape", "transpose", "permute", "contiguous", "flatten"})


def is_reshape(n: Any) -> bool:
    """Whether `n` is a node that only lays its input's entries out anew (view, reshape,
    transpose, permute, contiguous, flatten; as a method or a torch function)."""
    if not isinstance(n, fx.Node):
        return False
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    return n.op in ("call_method", "call_function") and name in _RESHAPES


# ----------------------------------------------------------------------------------------- rule helpers
def passthrough(values: str | Callable | None = "apply") -> Rule:
    """A channel-local op with no per-channel parameters (activation, dropout, identity).

    `values` says what happens to a channel that is constant: "apply" runs the op on the
    constants (right for element-wise ops), "keep" keeps them, "zero" keeps only zeros,
    None forgets them; or a function (ctx, values) -> values.
    """
    def rule(ctx: RuleContext):
        ids = ctx.ids(ctx.x)
        if ids is None:
            return None
        return ids, _values(ctx, values)
    rule.__name__ = "passthrough"
    return rule


def channel_local(params: dict[str, int] | None = None, dim: int = 1, attrs: tuple[str, ...] = (),
                  values: str | Callable | None = None) -> Rule:
    """A module that treats channels on axis `dim` one by one with per-channel parameters
    (``params``: attribute name -> the parameter's channel axis). Shrink slices those
    parameters and sets each of `attrs` to the kept count.

    `values` as in :func:`passthrough`; the default (None) forgets constants, which is always
    safe. Pass ``values="apply"`` when the op is point-wise per channel (a scale, a bias, an
    activation): then a channel zeroed before it is known to hold ``op(0)`` after it, and Shrink
    can remove it even where the mask sits before the op.
    """
    def rule(ctx: RuleContext):
        ids = ctx.ids(ctx.x)
        if ids is None:
            return None
        m = ctx.module
        ps = [(m, k, d) for k, d in (params or {}).items() if m is not None and getattr(m, k, None) is not None]
        ctx.place("local", ids, dim, params=ps, attrs=[(m, a) for a in attrs])
        return ids, _values(ctx, values)
    rule.__name__ = "channel_local"
    return rule


def frozen(reason: str) -> Rule:
    """An op whose channels must never be removed (its inputs' groups are frozen)."""
    def rule(ctx: RuleContext):
        ctx.freeze_inputs(f"{ctx.describe()}: {reason}")
        return None
    rule.__name__ = "frozen"
    return rule


def _values(ctx: RuleContext, how) -> np.ndarray | None:
    v = ctx.values(ctx.x)
    if v is None or how is None:
        return None
    if callable(how):
        return how(ctx, v)
    if how == "keep":
        return v
    if how == "zero":
        return np.where(v == 0, 0.0, np.nan)
    # "apply": run the op itself on the constants (the op is element-wise)
    try:
        t = torch.as_tensor(v, dtype=torch.float64)
        args = [_scalar(ctx.g.gm, a) for a in ctx.node.args[1:]]
        kwargs = {k: _scalar(ctx.g.gm, a) for k, a in ctx.node.kwargs.items()}
        with torch.no_grad():
            if ctx.node.op == "call_module":
                out = _apply_module(ctx.module, t)
            elif ctx.node.op == "call_function":
                out = ctx.node.target(t, *args, **kwargs)
            else:
                out = getattr(t, ctx.node.target)(*args, **kwargs)
        out = out.detach().double().numpy()
        return out if out.shape == v.shape else None
    except Exception:
        return None


def _scalar(gm: fx.GraphModule, a: Any) -> Any:
    """`a`, or for a get_attr of a one-element tensor (Gemma 4's clamp bounds) its value; any
    other node cannot be applied to constants (ValueError)."""
    if not isinstance(a, fx.Node):
        return a
    if a.op == "get_attr":
        prefix, _, name = str(a.target).rpartition(".")
        t = getattr(submodule(gm, prefix), name, None)
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t.detach().reshape(()))
    raise ValueError(f"{a.name} is no constant")


def _apply_module(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    p = next(m.parameters(), None)
    return m(t.to(p.dtype if p is not None else torch.float32)).double()


