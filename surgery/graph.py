"""Graph edits on a captured GraphModule: insert after a node, replace a node, extract a set of
nodes into a child GraphModule. Every edit recompiles and lints the graph.

Example::

    >>> import torch, torch.fx as fx
    >>> gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    >>> node = gm.graph.find_nodes(op="call_module", target="0")[0]
    >>> _ = insert_after(gm, node, torch.nn.Identity(), "probe")
    >>> [n.target for n in gm.graph.nodes if n.op == "call_module"]
    ['0', 'probe', '1']
"""
from __future__ import annotations

import heapq
import inspect
import operator
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import SurgeryError
from .pickling import CapturedGraphModule

__all__ = ["drop_identities", "insert_after", "replace_node", "extract", "unique_name", "finish", "submodule",
           "layer_of",
           "drop_dead_nodes", "drop_unused_submodules", "inplace_kind", "inplace_flag", "IN_PLACE_OPERATORS",
           "graph_module_without_code"]


def submodule(root: nn.Module, target: str) -> nn.Module:
    """``root.get_submodule(target)`` by walking the ``_modules`` dictionaries directly (3-4x
    faster: channel analysis and Shrink look up every call_module node's module several
    times). Anything unusual (a missing name, an attribute that is not a child module) goes
    to get_submodule, for its error message."""
    m = root
    try:
        for part in target.split(".") if target else ():
            m = m._modules[part]
    except (KeyError, AttributeError):
        return root.get_submodule(target)
    if m is None:
        return root.get_submodule(target)
    return m


def layer_of(node: fx.Node, path: str = "") -> tuple[str, nn.Module | None]:
    """The qualified name (from the captured model; `path` is the qualified path of the node's
    graph, "" for the captured graph itself) and the module of a call_module node, or of the layer
    whose weight a functional node reads (``F.conv2d`` on a Conv2dSame's own weight, traced into);
    the node's name and None for any other node."""
    gm = node.graph.owning_module
    if node.op == "call_module":
        target = str(node.target)
    else:
        reads = [str(a.target).rpartition(".") for a in node.all_input_nodes if a.op == "get_attr"]
        target = next((prefix for prefix, _, name in reads if prefix and name in ("weight", "in_proj_weight")
                       and type(submodule(gm, prefix)) is not nn.Module), None)
        if target is None:
            return node.name, None
    return f"{path}.{target}" if path else target, submodule(gm, target)


def finish(gm: fx.GraphModule, lint: bool = True) -> fx.GraphModule:
    """Lint, drop submodules no node uses any more, recompile. ``lint=False`` for a caller that
    runs the whole graph at once after (Shrink's verification): a malformed graph fails there,
    and the lint would walk every node's arguments and targets first (1-2 ms on a 300-node graph)."""
    if lint:
        gm.graph.lint()
    drop_unused_submodules(gm)
    gm.recompile()
    return gm


def drop_identities(gm: fx.GraphModule) -> None:
    """Calls of plain ``nn.Identity`` layers (no hooks) leave the graph: each returns its input,
    and every later step (the analysis, the edits, Shrink's runs, the generated code) would pay
    for the node. The layers stay in the module tree."""
    for node in gm.graph.find_nodes(op="call_module"):
        m = submodule(gm, str(node.target))
        if type(m) is nn.Identity and len(node.args) == 1 and isinstance(node.args[0], fx.Node) and not node.kwargs \
                and not (m._forward_hooks or m._forward_pre_hooks):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def drop_dead_nodes(graph: fx.Graph) -> None:
    """``graph.eliminate_dead_code()`` without its lint (whoever edits the graph lints it once at
    the end, see :func:`finish`), and asking ``Node.is_impure`` only of nodes without users:
    the question looks up the module of every call_module node, which was most of the cost.
    An in-place op is never dead (``x.mul_(2)`` has no users and changes ``x``), whatever fx says,
    and neither is a call of a model's own leaf function whose result goes unused: it is called for
    what it does to its arguments (torchvision MViT's ``_add_shortcut`` adds in place)."""
    gm = graph.owning_module
    for node in reversed(graph.nodes):
        if not node.users and node.op not in ("placeholder", "output") and not node.is_impure() and \
                inplace_kind(gm, node) is None and not _leaf_function_call(node):
            graph.erase_node(node)


def _leaf_function_call(node: fx.Node) -> bool:
    """A call of a function from outside torch and the standard library that fx kept whole (a
    ``torch.fx.wrap``-ed or autowrapped function of the model's) with a tensor among its arguments."""
    if node.op != "call_function":
        return False
    module = getattr(node.target, "__module__", None) or ""
    if module.split(".")[0] in ("torch", "_operator", "operator", "builtins", "math", "surgery"):
        return False
    return any(isinstance(a, fx.Node) and a.op != "get_attr" for a in node.all_input_nodes)


# ``x += y`` on a tensor changes x; the out-of-place operator computes the same value
IN_PLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
                      operator.imod: operator.mod, operator.ipow: operator.pow, operator.iand: operator.and_,
                      operator.ior: operator.or_, operator.ixor: operator.xor, operator.ilshift: operator.lshift,
                      operator.irshift: operator.rshift, operator.imatmul: operator.matmul}
# methods ending in "_" that change no value
_NOT_MUTATING = {"requires_grad_", "share_memory_", "detach_", "retain_grad_"}


def inplace_flag(fn: Any, node: fx.Node) -> inspect.BoundArguments | None:
    """The bound arguments of a functional call made with ``inplace=True``."""
    try:
        bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    return bound if bound.arguments.get("inplace") is True else None


def inplace_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """How `node` changes its first argument in place ("method", "operator", "function",
    "flag", "module", "setitem": ``x[idx] = v``), or None when it does not."""
    if node.op == "call_method":
        t = node.target
        return "method" if t.endswith("_") and not t.endswith("__") and t not in _NOT_MUTATING else None
    if node.op == "call_function":
        fn = node.target
        if fn is operator.setitem:
            return "setitem" if node.args and isinstance(node.args[0], fx.Node) else None
        if fn in IN_PLACE_OPERATORS:
            return "operator" if node.args and isinstance(node.args[0], fx.Node) and \
                isinstance(node.args[0].meta.get("shape"), torch.Size) else None
        name = getattr(fn, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and (getattr(torch, name, None) is fn or
                                                               getattr(F, name, None) is fn):
            return "function"
        # F.relu(x, inplace=True) and friends (a signature look-up only where it can matter)
        if getattr(fn, "__module__", "") == "torch.nn.functional" and ("inplace" in node.kwargs or len(node.args) > 1):
            return "flag" if inplace_flag(fn, node) is not None else None
        return None
    if node.op == "call_module":
        return "module" if getattr(submodule(gm, str(node.target)), "inplace", False) is True else None
    return None


def drop_unused_submodules(gm: fx.GraphModule) -> None:
    """``gm.delete_all_unused_submodules()`` in one walk of the module tree: a submodule stays
    when a node calls it or one of its ancestors, or reads it or an attribute beneath it."""
    called: set[str] = set()
    used: set[str] = set()
    for n in gm.graph.nodes:
        if n.op in ("call_module", "get_attr") and isinstance(n.target, str):
            parts = n.target.split(".")
            used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            if n.op == "call_module":
                called.add(n.target)

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in list(module._modules.items()):
            qual = prefix + name
            if qual not in used:
                delattr(module, name)
            elif child is not None and qual not in called:
                walk(child, qual + ".")
    walk(gm, "")


def unique_name(gm: nn.Module, base: str) -> str:
    """A fresh top-level attribute name on `gm` derived from `base` (dots become underscores)."""
    base = base.replace(".", "_") or "module"
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def insert_after(gm: fx.GraphModule, node: fx.Node, module: nn.Module, name: str,
                 args: tuple = (), kwargs: dict | None = None) -> fx.Node:
    """Add `module` as submodule `name` and call it on `node`'s output; every former user of
    `node` now reads the new node. Extra `args`/`kwargs` follow the node in the call."""
    if node.graph is not gm.graph:
        raise SurgeryError(f"node {node.name!r} does not belong to this graph")
    if node.op == "output":
        raise SurgeryError("cannot insert after the graph output")
    name = unique_name(gm, name)
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node, *args), kwargs or {})
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    new.meta.update({k: v for k, v in node.meta.items() if k in ("shape", "dtype")})
    gm.graph.lint()
    gm.recompile()
    return new


def replace_node(gm: fx.GraphModule, node: fx.Node, replacement: nn.Module | Callable[..., Any],
                 name: str | None = None) -> fx.Node:
    """Replace `node` by a call of `replacement` with the same arguments.

    A module becomes a submodule (named `name`, or the old module's name when `node` called a
    module, which it then replaces in place); a function becomes a ``call_function`` node.
    """
    if node.op in ("placeholder", "output", "get_attr"):
        raise SurgeryError(f"cannot replace {node.op} node {node.name!r}")
    graph = gm.graph
    if isinstance(replacement, nn.Module):
        if node.op == "call_module" and name is None:
            target = str(node.target)
            users = [n for n in graph.nodes if n.op == "call_module" and n.target == target and n is not node]
            if users:  # the module is shared: give the replacement its own name
                target = unique_name(gm, target)
            else:
                gm.delete_submodule(target)
            gm.add_submodule(target, replacement)
        else:
            target = unique_name(gm, name or node.name)
            gm.add_submodule(target, replacement)
        with graph.inserting_after(node):
            new = graph.call_module(target, node.args, node.kwargs)
    else:
        with graph.inserting_after(node):
            new = graph.call_function(replacement, node.args, node.kwargs)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    finish(gm)
    return new


def _topo_sort(graph: fx.Graph) -> None:
    """Reorder nodes so that every node follows its inputs (stable: keeps the existing order
    where it is already valid)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    indeg = {n: len(set(n.all_input_nodes)) for n in graph.nodes}
    ready = sorted((n for n, d in indeg.items() if d == 0), key=order.__getitem__)
    out: list[fx.Node] = []
    heap = [(order[n], id(n), n) for n in ready]
    heapq.heapify(heap)
    while heap:
        _, _, n = heapq.heappop(heap)
        out.append(n)
        for u in n.users:
            indeg[u] -= 1
            if indeg[u] == 0:
                heapq.heappush(heap, (order[u], id(u), u))
    if len(out) != len(order):
        raise SurgeryError("graph has a cycle after an edit")
    root = graph._root  # the sentinel before the first node
    cursor = root
    for n in out:
        if cursor.next is not n:
            cursor.append(n)
        cursor = n


def extract(gm: fx.GraphModule, nodes: Iterable[fx.Node], name: str,
            wrap: Callable[[fx.GraphModule], nn.Module] | None = None) -> fx.Node:
    """Move `nodes` into a child GraphModule called as one node; returns that node.

    The child's inputs are the values the set reads from outside it; its output is the single
    value (or tuple of values) used outside. ``get_attr`` nodes read only by the set move with
    it. The set must be convex: no path may leave it and come back. `wrap`, when given, wraps
    the child module (e.g. in a saved-tensor-hooks context) before it is installed.
    """
    graph = gm.graph
    chosen = [n for n in graph.nodes if n in set(nodes)]
    if not chosen:
        raise SurgeryError(f"extract({name!r}): empty node set")
    for n in chosen:
        if n.op in ("placeholder", "output"):
            raise SurgeryError(f"extract({name!r}): cannot move {n.op} node {n.name!r}")
    inside = set(chosen)
    for n in list(graph.nodes):
        if n.op == "get_attr" and n not in inside and n.users and all(u in inside for u in n.users):
            inside.add(n)
    chosen = [n for n in graph.nodes if n in inside]
    _check_convex(inside, name)

    inputs: list[fx.Node] = []
    for n in chosen:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in chosen if any(u not in inside for u in n.users)]
    if not outputs:
        raise SurgeryError(f"extract({name!r}): nothing in the set is used outside it")

    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = sub.placeholder(a.name)
        env[a].meta.update(a.meta)
    for n in chosen:
        env[n] = sub.node_copy(n, lambda x: env[x])
    sub.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    child: nn.Module = CapturedGraphModule(gm, sub, class_name=name)
    if wrap is not None:
        child = wrap(child)
    target = unique_name(gm, name)
    gm.add_submodule(target, child)

    with graph.inserting_before(chosen[0]):
        call = graph.call_module(target, tuple(inputs))
    if len(outputs) == 1:
        call.meta.update(outputs[0].meta)
        outputs[0].replace_all_uses_with(call)
    else:
        for i, o in enumerate(outputs):
            with graph.inserting_after(call):
                item = graph.call_function(operator.getitem, (call, i))
            item.meta.update(o.meta)
            o.replace_all_uses_with(item)
    for n in reversed(chosen):
        graph.erase_node(n)
    _topo_sort(graph)
    finish(gm)
    return call


def _check_convex(inside: set[fx.Node], name: str) -> None:
    # nodes outside reachable from the set; if any of them feeds the set, a path leaves and returns
    frontier = [u for n in inside for u in n.users if u not in inside]
    seen: set[fx.Node] = set()
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u in inside:
                raise SurgeryError(f"extract({name!r}): the node set is not convex: {n.name!r} lies outside "
                                   f"it on a path between two of its nodes (it feeds {u.name!r})")
            frontier.append(u)


def _code_not_generated(*args: Any, **kwargs: Any) -> None:
    raise SurgeryError("this GraphModule's code was never generated: call gm.recompile() first "
                       "(a surgery bug: please report it)")


def _install(src: nn.Module, dst: nn.Module, target: str) -> None:
    """Put `src`'s attribute at dotted path `target` at the same path in `dst`, as
    ``fx.GraphModule``'s constructor does: fresh containers on the way, the object itself by
    reference, a plain tensor as a buffer."""
    *path, field = target.split(".")
    for item in path:
        f, t = getattr(src, item), dst._modules.get(item)
        if f is t:
            return  # a parent is installed already, and with it everything beneath it
        if t is None:
            t = nn.Module()
            setattr(dst, item, t)
        src, dst = f, t
    value = getattr(src, field)
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        dst.register_buffer(field, value)
    else:
        setattr(dst, field, value)


def graph_module_without_code(root: nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """``fx.GraphModule(root, graph, class_name)`` without generating its code (5-10 ms on a
    few hundred nodes), for compress, which edits the graph before anything runs the code and
    recompiles at the end. Until ``recompile()``, calling the module raises."""
    stub = fx.Graph()
    stub.output(stub.call_function(_code_not_generated, (stub.placeholder("*args"),)))
    gm = CapturedGraphModule({}, stub, class_name=class_name)
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            _install(root, gm, str(node.target))
    # what GraphModule's graph setter and constructor do with a graph, less the recompile
    gm._graph = graph
    graph.owning_module = gm
    if graph._tracer_cls and "<locals>" not in graph._tracer_cls.__qualname__:
        gm._tracer_cls = graph._tracer_cls
    gm._tracer_extras = getattr(graph, "_tracer_extras", None) or {}
    return gm
