"""Capture: trace an arbitrary model with torch.fx into a GraphModule, with shapes.

Example::

    >>> import torch, torchvision
    >>> from surgery import capture
    >>> gm = capture(torchvision.models.resnet18(weights=None), (torch.randn(1, 3, 64, 64),))
    >>> gm.graph.find_nodes(op="call_module", target="layer1.0.conv1")[0].meta["shape"]
    torch.Size([1, 64, 16, 16])

Models whose forward mixes traceable code with data-dependent parts (detection heads,
iterative refinement loops) are captured with the smallest untraceable submodules kept
opaque: they stay as single `call_module` nodes that run their eager forward.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from .attributes import IndexedAttributes, attributes_restored
from .calling import as_inputs, entry_shell, traced_entry
from .codelines import failing_line
from .concrete import ConcreteTracing, specialised_dims
from .copying import SourceTree, copy_module, gc_paused, tree_modules
from .errors import SurgeryError, TraceFailure, first_line, warn
from .graph import drop_identities, graph_module_without_code, submodule
from .inplace import rewrite_inplace
from .layers import restore_layers, torch_layer_subclass, traced_as_ops, traced_as_ops_candidate
from .libraries import library_leaves, whole_layer
from .nested import submodule_examples
from .pickling import CapturedGraphModule
from .progress import staged
from .shapes import annotate_shapes, complete_traced_shapes
from .signature import (
    TraceArguments,
    annotate_inputs,
    arguments_in_failure,
    bake,
    bind_arguments,
    control_flow_hint,
    shape_failure,
)

__all__ = ["capture", "surgery_meta", "as_inputs"]

LeafSpec = type | str


def surgery_meta(gm: fx.GraphModule) -> dict[str, Any]:
    """The dict where surgery keeps its bookkeeping on a GraphModule (`gm.meta["surgery"]`)."""
    meta = gm.meta.setdefault("surgery", {})
    meta.setdefault("opaque", {})
    meta.setdefault("passes", [])
    return meta


# argument types that fx.Tracer.create_arg passes on to fx.proxy.TracerBase.create_arg unchanged
# (exact types: a namedtuple, a Parameter or a Proxy subclass takes fx's full path)
_PLAIN_ARGS = frozenset({fx.Proxy, tuple, list, dict, int, float, bool, str, type(None), slice,
                         torch.dtype, torch.device, torch.memory_format, torch.layout})


class _Tracer(ConcreteTracing, IndexedAttributes, fx.Tracer):
    """An fx Tracer that keeps user/opaque leaves, traces the top-level forward's constant
    arguments as constants (see :mod:`surgery.signature`), and remembers which module was being
    traced when tracing failed (the innermost module on the call stack) and which proxies it
    was asked to branch on."""

    # fx re-creates the tracer class with no arguments when a GraphModule is unpickled
    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: set[str] | None = None,
                 arguments: TraceArguments | None = None, leaf_functions: tuple[Callable, ...] = ()):
        library_types, library_functions = library_leaves()
        super().__init__(autowrap_functions=(*leaf_functions, *library_functions))
        self.leaf_types = (*leaf_types, *library_types)
        self.leaf_names = leaf_names or set()
        self.arguments = arguments
        self.stack: list[str] = []
        self.failure_stack: list[str] | None = None
        self.branched_on: list[fx.Node] = []
        self.as_ops: nn.Module | None = None  # the layer being traced as plain ops (surgery.layers)

    def create_args_for_root(self, root_fn: Callable[..., Any], is_module: bool,
                             concrete_args: dict[str, Any] | tuple | None = None) -> tuple[Callable[..., Any], list]:
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        if self.arguments is not None and self.arguments.constants:
            args = bake(self, args, self.arguments)
        return fn, args

    # fx raises on both; the proxy tells which arguments the failure involves
    def to_bool(self, obj: fx.Proxy) -> bool:
        self.branched_on.append(obj.node)
        return super().to_bool(obj)

    def iter(self, obj: fx.Proxy) -> Iterator:
        self.branched_on.append(obj.node)
        return super().iter(obj)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)) or \
                whole_layer(m):
            return True
        if m is self.as_ops:
            return False
        return super().is_leaf_module(m, module_qualified_name) or torch_layer_subclass(type(m))

    def create_arg(self, a: Any) -> Any:
        # fx's Tracer tests every argument against Parameter, Tensor, Module and its constant
        # types (~4 us, a third of tracing) before handing it to the base class, which has the
        # fast path for proxies, containers and numbers: those types go there directly
        if type(a) in _PLAIN_ARGS:
            return fx.proxy.TracerBase.create_arg(self, a)
        return super().create_arg(a)

    def call_module(self, m, forward, args, kwargs):
        if self.computing:  # a node's value being computed (see ConcreteTracing): nothing to trace or record
            return super().call_module(m, forward, args, kwargs)
        try:
            qual = self.path_of_module(m)
        except NameError:  # a module built inside forward (`nn.ReLU()(x)`): its ops are the caller's
            return forward(*args, **kwargs)
        self.stack.append(qual)
        known = self.example is not None or self.arguments is not None and bool(self.arguments.supplied)
        ops = traced_as_ops(m, args, kwargs, known) if traced_as_ops_candidate(m) and not (
            qual in self.leaf_names or self.leaf_types and isinstance(m, self.leaf_types)) else None
        if ops is not None:  # traced as plain ops (see surgery.layers)
            forward, self.as_ops = ops, m
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failure_stack is None:
                self.failure_stack = list(self.stack)
            raise
        finally:
            self.as_ops = None
            self.stack.pop()


def _split_leaves(leaf_modules: Iterable[LeafSpec]) -> tuple[tuple[type, ...], set[str], tuple[Callable, ...]]:
    types, names, functions = [], set(), []
    for leaf in leaf_modules:
        if isinstance(leaf, type) and issubclass(leaf, nn.Module):
            types.append(leaf)
        elif isinstance(leaf, str):
            names.add(leaf)
        elif callable(leaf) and not isinstance(leaf, type):
            functions.append(leaf)  # autowrap_functions: called as one node, never traced into
        else:
            raise SurgeryError(f"leaf_modules entries must be nn.Module classes, qualified names or functions, "
                               f"got {leaf!r}")
    return tuple(types), names, tuple(functions)


def _reason(error: BaseException) -> str:
    """Why a module stays opaque: the error, and the line of the model's code that raised it."""
    line = failing_line(error)
    return first_line(error) + (f" at {line}" if line else "")


def _trace(root: nn.Module, leaf_modules: Iterable[LeafSpec], arguments: TraceArguments | None
           ) -> tuple[fx.Graph, dict[str, str]]:
    leaf_types, leaf_names, leaf_functions = _split_leaves(leaf_modules)
    opaque: dict[str, str] = {}
    retries_left = None  # one retry per submodule at most (counted at the first failure)
    # plain fx first; on a failure, once more with concrete values beside the proxies (an eager
    # forward per trace: kept only while it gets further than plain fx did)
    concrete, plain_failure = False, None
    while retries_left is None or retries_left >= 0:
        tracer = _Tracer(leaf_types, leaf_names | set(opaque), arguments, leaf_functions)
        if concrete:
            # the constants too: the guards that bake() puts on them then compute, as every node does
            tracer.example = {**arguments.supplied, **arguments.constants}
            tracer.proxy_buffer_attributes = True  # a buffer sliced by a size stays a graph op, not a constant
        try:
            graph = tracer.trace(root, arguments.fx_concrete if arguments else None)
            graph._surgery_guards = list(tracer.__dict__.get("guards", ()))  # see surgery.concrete
            graph._surgery_specialised = specialised_dims(tracer.__dict__.get("specialised", {}))
            return graph, opaque
        except Exception as e:  # fx raises many kinds: TraceError, TypeError, RuntimeError...
            culprit = (tracer.failure_stack or [""])[-1]
            if plain_failure is None and arguments is not None and arguments.supplied:
                plain_failure, concrete = (culprit, first_line(e)), True
                continue
            if concrete and not opaque and plain_failure == (culprit, first_line(e)):
                concrete = False
            retries_left = (sum(1 for _ in root.modules()) if retries_left is None else retries_left) - 1
            if not culprit or culprit in opaque:
                names = arguments_in_failure(getattr(tracer, "graph", None), e, tracer.branched_on)
                failure = TraceFailure(type(root).__name__ if not culprit else culprit, e,
                                       control_flow_hint(names, arguments))
                failure.arguments = names  # for the shell's reason, should capture descend
                raise failure from e
            # an opaque module hides its descendants: drop any of them recorded earlier
            opaque = {k: v for k, v in opaque.items() if not k.startswith(culprit + ".")}
            opaque[culprit] = _reason(e)
        finally:  # the concrete trace's example values (those a proxy still held): freed now, not at the next gc
            for state in ("values", "lifetimes"):
                tracer.__dict__.pop(state, None)
    raise TraceFailure(type(root).__name__, "gave up after marking every submodule opaque")


def _graph_module(module: nn.Module, leaf_modules, arguments: TraceArguments | None, code: bool = True,
                  examples: dict[int, dict[str, Any]] | None = None) -> tuple[fx.GraphModule, dict[str, str]]:
    graph, opaque = _trace(module, leaf_modules, arguments)
    # an opaque module runs its own forward eagerly, but its children are traced where they can
    # be (the shell strategy, at any depth): their layers stay visible to the channel analysis
    named = set(_split_leaves(leaf_modules)[1])
    for qual in [q for q in opaque if q not in named]:
        _capture_children(submodule(module, qual), qual + ".", leaf_modules, opaque, examples)
    if code:
        gm = CapturedGraphModule(module, graph, class_name=type(module).__name__)
    else:
        gm = graph_module_without_code(module, graph, type(module).__name__)
    restore_layers(gm, module)
    drop_identities(gm)
    # plain attributes the parent may read (out_channels, num_classes...) survive the swap
    for k, v in vars(module).items():
        if not k.startswith("_") and k != "training" and not hasattr(gm, k):
            setattr(gm, k, v)
    # fx makes the GraphModule and the containers on dotted paths anew, in training mode: give
    # each the flag of the module it stands for (an eval-mode model captures as eval mode)
    for name, m in gm.named_modules():
        if type(m) is nn.Module or m is gm:
            try:
                m.training = submodule(module, name).training
            except AttributeError:
                pass
    return gm, opaque


_MODULE_API = set(dir(nn.Module))


def _has_extra_methods(module: nn.Module) -> bool:
    """A class whose parent may call methods other than forward cannot be swapped for a graph."""
    for cls in type(module).__mro__:
        if cls in (nn.Module, object) or cls.__module__.startswith("torch.nn"):
            continue
        for k, v in vars(cls).items():
            if callable(v) and not k.startswith("_") and k != "forward" and k not in _MODULE_API:
                return True
    return False


def _capture_children(module: nn.Module, prefix: str, leaf_modules, opaque: dict[str, str],
                      examples: dict[int, dict[str, Any]] | None = None) -> None:
    """`module` stays eager: swap each child for its traced graph, descending where a child's
    own forward is untraceable too. A child with `examples` (what it received in an eager run:
    :func:`surgery.nested.submodule_examples`) is traced with their values known where fx alone fails."""
    leaf_types, leaf_names, leaf_functions = _split_leaves(leaf_modules)
    for name, child in list(module.named_children()):
        qual = f"{prefix}{name}"
        if not any(True for _ in child.children()):
            continue  # a leaf layer runs as it is
        if qual in leaf_names or (leaf_types and isinstance(child, leaf_types)) or whole_layer(child):
            continue
        if _has_extra_methods(child):
            opaque[qual] = f"eager: {type(child).__name__} has methods besides forward that its parent may call"
        else:
            try:
                inner = [n[len(qual) + 1:] for n in leaf_names if n.startswith(qual + ".")]
                known = (examples or {}).get(id(child))
                known = TraceArguments(type(child).__name__, supplied=known) if known else None
                gm, sub = _graph_module(child, (*leaf_types, *leaf_functions, *inner), known, examples=examples)
                setattr(module, name, gm)
                opaque.update({f"{qual}.{k}": v for k, v in sub.items()})
                continue
            except TraceFailure as e:
                if not any(True for _ in child.children()):
                    opaque[qual] = _reason(e.fx_error) if isinstance(e.fx_error, BaseException) else str(e)
                    continue
        _capture_children(child, qual + ".", leaf_modules, opaque, examples)


def _shell(root: nn.Module) -> fx.GraphModule:
    """A GraphModule whose graph calls `root` (kept eager) as one node named ``model``."""
    graph = fx.Graph()
    args, kwargs = [], {}
    for p in inspect.signature(root.forward).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TraceFailure(type(root).__name__, "its forward takes *args/**kwargs",
                               "wrap the model in a module with an explicit forward signature")
        default = () if p.default is inspect.Parameter.empty else (p.default,)
        ph = graph.placeholder(p.name, default_value=p.default) if default else graph.placeholder(p.name)
        if p.kind == p.KEYWORD_ONLY:
            kwargs[p.name] = ph
        else:
            args.append(ph)
    graph.output(graph.call_module("model", tuple(args), kwargs))
    holder = nn.Module()
    holder.model = root
    return CapturedGraphModule(holder, graph, class_name=type(root).__name__)


@gc_paused()
@staged(lambda model, *a, **k: f"capture {type(model).__name__}")
def capture(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    leaf_modules: Sequence[LeafSpec] = (),
    autowrap_functions: Sequence[Callable] = (),
    concrete_args: dict[str, Any] | None = None,
    descend: bool = True,
    _code: bool = True,
) -> fx.GraphModule:
    """Trace a copy of `model` into a GraphModule that keeps its qualified module names.

    Args:
        model: any nn.Module; it is never mutated. A copy is traced, whose parameters and buffers
            are copy-on-write (:func:`surgery.copying.lazy_copy`): they share the caller's memory
            until either side writes into them, so the capture of a large model does not hold
            its weights twice, and training the captured module never changes the caller's.
        example_inputs: a tensor or tuple of positional inputs, or a dict of keyword inputs (its
            keys name the forward's arguments, or go to its ``**kwargs``; they become the captured
            module's arguments, so ``gm(**example_inputs)`` runs it). When given, every node is
            annotated with ``meta["shape"]`` and ``meta["dtype"]`` (see :func:`surgery.shapes.annotate_shapes`).
            The forward's arguments they do not supply are traced at their default where that
            is a constant (None, a number, a bool, a string, a tuple of those): ``if mask is not
            None`` takes the default branch. Each keeps its placeholder, defaulting to that value
            and guarded: the module raises when called with another (see :mod:`surgery.signature`).
        leaf_modules: module classes or qualified names to keep opaque (not traced into).
        autowrap_functions: functions to keep opaque: each call is one node, never traced into.
            timm's registries (``register_notrace_module``/``register_notrace_function``) are
            honoured without being named, whenever timm is loaded.
        concrete_args: argument name -> value to trace it at, for arguments that steer control
            flow; wins over the example inputs and the defaults. Constants are traced as above;
            anything else (``torch.fx.PH`` structures) goes to ``torch.fx.Tracer.trace``.
        descend: what to do when the top-level forward itself is data-dependent (detection
            and optical-flow models). True: keep that forward eager as a single node named
            ``model`` and trace each of its children instead (names gain the ``model.``
            prefix; ``gm.meta["surgery"]["shell"]`` is True). False: raise TraceFailure.

    Submodules whose own forward cannot be traced are kept opaque automatically, listed in
    ``gm.meta["surgery"]["opaque"]`` (name -> reason) and reported in one warning. A top-level
    forward that cannot be traced raises :class:`TraceFailure` when ``descend=False`` or when
    nothing beneath it can be traced either, naming the arguments its control flow depends on;
    so does a forward argument without a default that the example inputs leave out. A failure
    while recording shapes raises :class:`~surgery.errors.ShapePropagationFailure` naming the node and its module.

    ``_code=False`` is for :func:`surgery.compress` alone: the GraphModule's code is not
    generated (compress edits the graph first and recompiles before anything calls it).
    """
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"capture expects an nn.Module, got {type(model).__name__}")
    inputs = as_inputs(example_inputs, model)
    arguments = bind_arguments(model, inputs, concrete_args)  # before the copy: a wrong call fails fast
    leaf_modules = (*leaf_modules, *autowrap_functions)
    try:
        root = copy_module(model)
    except Exception as e:
        raise SurgeryError(f"cannot copy {type(model).__name__} before tracing ({first_line(e)}); "
                           "surgery never traces the caller's model in place") from e
    shell = False
    try:
        with traced_entry(root, arguments), attributes_restored(root):
            gm, opaque = _graph_module(root, leaf_modules, arguments, code=_code)
        if annotate_inputs(gm.graph, arguments) and _code:
            gm.recompile()
    except TraceFailure as failure:
        if not descend:
            raise
        opaque: dict[str, str] = {}
        examples = submodule_examples(root, inputs) if inputs is not None else None  # what each child gets
        _capture_children(root, "", leaf_modules, opaque, examples)
        if not any(isinstance(m, fx.GraphModule) for m in tree_modules(root)):
            raise failure
        # a forward with *args/**kwargs has no placeholders of its own: the shell takes the entry's
        params = inspect.signature(root.forward).parameters.values()
        varying = arguments.entry is not None and any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)
        gm, shell = (entry_shell(root, arguments) if varying else _shell(root)), True
        reason = _reason(failure.fx_error) if isinstance(failure.fx_error, BaseException) else str(failure.fx_error)
        if getattr(failure, "arguments", None):  # the fix is the caller's: say which argument
            reason += f"; {failure.hint}"
        opaque = {"model": reason, **{f"model.{k}": v for k, v in opaque.items()}}
    meta = surgery_meta(gm)
    if not shell:  # the model's own classes, sharing every layer with the graph: see surgery.shrink.modules
        meta["source"] = SourceTree(root)
    # the shell runs the eager forward, which takes every argument as it comes: nothing is constant
    meta.update(opaque=dict(opaque), class_name=type(model).__name__, shell=shell,
                constants={} if shell else dict(arguments.constants),
                guards=list(getattr(gm.graph, "_surgery_guards", ())),  # see surgery.concrete
                specialised=dict(getattr(gm.graph, "_surgery_specialised", {})))
    if opaque:
        listing = "; ".join(f"{k} ({v})" for k, v in opaque.items())
        warn(f"surgery.capture({type(model).__name__}): kept {len(opaque)} module(s) opaque "
             f"because their forward cannot be traced: {listing}")
    if inputs is not None:
        try:
            if opaque or not complete_traced_shapes(gm, inputs):  # a concrete trace has run the forward once already
                annotate_shapes(gm, inputs)
        except SurgeryError:
            raise  # already names its culprit
        except Exception as e:  # a raw TypeError at %mul_1 names neither the module nor the argument
            raise shape_failure(gm, e, arguments) from e
        rewrite_inplace(gm)  # needs the dtypes; see surgery.inplace
    return gm
