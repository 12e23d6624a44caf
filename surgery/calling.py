"""Example inputs, and the one way to call a model with them.

Example inputs are positional (a tuple, or a single tensor) or keyword (a dict, such as a
tokenizer's output ``{"input_ids": ids, "attention_mask": am}``). :func:`as_inputs` normalises
them, :func:`call` runs a model on them, :func:`bind_placeholders` turns keyword inputs into the
positional list that an ``fx.Interpreter`` (ShapeProp) takes.

Capture traces the top-level forward through an *entry* (:func:`traced_entry`): a function with
an explicit signature that calls the forward by keyword and keeps the type of what it returns.

Example::

    >>> import torch
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x, mask=None, *, scale=1.0):
    ...         return x * scale if mask is None else x * mask * scale
    >>> call(Net(), {"x": torch.ones(2), "scale": 3.0})
    tensor([3., 3.])
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch
import torch.fx as fx
from torch import nn

from .pickling import CapturedGraphModule
from .pickling import resolve as _resolve

if TYPE_CHECKING:
    from .signature import TraceArguments

__all__ = ["as_inputs", "call", "input_values", "bind_placeholders", "traced_entry", "keep_types", "typed_dict",
           "entry_shell"]


def _parameters(fn: Callable[..., Any]) -> Mapping[str, inspect.Parameter] | None:
    try:
        return inspect.signature(fn.forward if isinstance(fn, nn.Module) else fn).parameters
    except (TypeError, ValueError):  # a builtin or TorchScript forward: nothing to read
        return None


def _takes_keywords(model: Callable[..., Any], keys: Iterable[str]) -> bool:
    if isinstance(model, fx.GraphModule):  # its graph, not its code, which compress regenerates last
        names = [str(n.target) for n in model.graph.find_nodes(op="placeholder")]
        return any(n.startswith("**") for n in names) or any(k in names for k in keys)
    params = _parameters(model)
    if params is None:
        return True
    return any(p.kind is p.VAR_KEYWORD for p in params.values()) or any(k in params for k in keys)


def as_inputs(example_inputs: Any, model: Callable[..., Any] | None = None) -> tuple | dict[str, Any] | None:
    """Normalise example inputs: None stays None, a mapping with string keys becomes a dict of
    keyword inputs, a tuple stays, anything else is one positional input.

    With `model`, a mapping none of whose keys names an argument of its forward (and a forward
    without ``**kwargs``) is one positional input, as it always was: ``{"a": x, "b": y}`` for
    ``forward(self, batch)``. ``({"a": x},)`` says so without relying on that rule.
    """
    if example_inputs is None:
        return None
    if isinstance(example_inputs, Mapping) and all(isinstance(k, str) for k in example_inputs):
        if model is not None and not _takes_keywords(model, example_inputs):
            return (example_inputs,)
        return dict(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list) and not all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    return (example_inputs,)


def call(model: Callable[..., Any], inputs: Any) -> Any:
    """``model(**inputs)`` for keyword inputs, ``model(*inputs)`` for positional ones (normalised
    by :func:`as_inputs` first). Every place surgery runs a model on example inputs calls this."""
    inputs = as_inputs(inputs, model)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*(inputs or ()))


def input_values(inputs: tuple | dict[str, Any] | None) -> tuple:
    """The example inputs' values, in order (positional or keyword alike)."""
    if inputs is None:
        return ()
    return tuple(inputs.values()) if isinstance(inputs, dict) else tuple(inputs)


_UNSET = object()


def bind_placeholders(graph: fx.Graph, inputs: tuple | dict[str, Any]) -> tuple:
    """`inputs` as the positional arguments of `graph`'s placeholders: keyword inputs by name,
    a placeholder they leave out at its default. Positional inputs come back as they are."""
    if not isinstance(inputs, dict):
        return tuple(inputs)
    left, out = dict(inputs), []
    for n in graph.find_nodes(op="placeholder"):
        name = str(n.target)
        if name.startswith("*"):
            break  # *args/**kwargs: an interpreter passes nothing by keyword
        out.append(left.pop(name) if name in left else n.args[0] if n.args else _UNSET)
    if left:
        raise TypeError(f"forward() got unexpected keyword argument(s) {', '.join(map(repr, left))}")
    while out and out[-1] is _UNSET:
        out.pop()
    missing = [str(n.target) for n, v in zip(graph.find_nodes(op="placeholder"), out) if v is _UNSET]
    if missing:
        raise TypeError(f"forward() missing required argument(s) {', '.join(map(repr, missing))}")
    return tuple(out)


# ---------------------------------------------------------------------------- output types
def _tracer_in(value: Any) -> fx.proxy.TracerBase | None:
    if isinstance(value, fx.Proxy):
        return value.tracer
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return next((t for t in map(_tracer_in, items) if t is not None), None)


def typed_dict(type_name: str, fields: dict[str, Any]) -> Any:
    """``cls(**fields)`` for the class named ``"module:qualname"``: the node :func:`keep_types`
    writes for a ModelOutput or an OrderedDict. Like ``signature._is_none``, it records itself
    as a node when the generated code is traced again (unpickling a GraphModule does), where the
    class itself would be called on proxies and flattened into a plain dict once more."""
    tracer = _tracer_in(fields)
    if tracer is not None:
        return tracer.create_proxy("call_function", typed_dict, (type_name, fields), {})
    return _resolve(type_name)(**fields)


def _typed(value: Any, tracer: fx.proxy.TracerBase) -> Any:
    t = type(value)
    if t is tuple or t is list:
        return t(_typed(v, tracer) for v in value)
    if isinstance(value, tuple) and hasattr(t, "_fields"):  # a namedtuple: fx keeps its type itself
        return t(*(_typed(v, tracer) for v in value))
    if t is dict:
        return {k: _typed(v, tracer) for k, v in value.items()}
    if isinstance(value, dict) and (dataclasses.is_dataclass(value) or t is collections.OrderedDict) \
            and all(isinstance(k, str) for k in value):
        # a Hugging Face ModelOutput (its keys are the fields it has set) or an OrderedDict
        items = {k: _typed(v, tracer) for k, v in value.items()}
        if "<locals>" in t.__qualname__:  # no name to find it by: the class itself (no pickling, then)
            return tracer.create_proxy("call_function", t, (), items)
        return tracer.create_proxy("call_function", typed_dict, (f"{t.__module__}:{t.__qualname__}", items), {})
    return value


def keep_types(value: Any) -> Any:
    """What a traced forward returned, with each dict subclass that fx would flatten into a plain
    dict replaced by a node that builds it (:func:`typed_dict`): a Hugging Face ``ModelOutput``
    (an ``OrderedDict`` and a dataclass, which fx's ``create_arg`` takes for a dict first) or an
    ``OrderedDict``. Namedtuples, dataclasses, tuples, lists and dicts keep their type in fx."""
    tracer = _tracer_in(value)
    return value if tracer is None else _typed(value, tracer)


# ------------------------------------------------------------------------------ the entry
_SOURCE = """\
def make(_surgery_forward, _surgery_keep_types):
    def forward(self, {params}):
        return _surgery_keep_types(_surgery_forward(self, {call}))
    return forward
"""


def _entry(forward: Callable[..., Any], arguments: TraceArguments) -> types.FunctionType:
    """A function for fx to trace in place of `forward`: parameters named ``arguments.entry``,
    keyword-only for keyword inputs (fx then makes each a placeholder, in that order), as in
    `forward` otherwise; it calls `forward` by keyword (``**kwargs`` keys too) and keeps the
    type of what it returns (:func:`keep_types`)."""
    sig = inspect.signature(forward)
    params = sig.parameters
    names = list(arguments.entry or ())
    named = [n for n in names if n in params]
    positional = [n for n in named if params[n].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                         inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if arguments.keywords:
        head, tail = [], names  # every parameter keyword-only: any order, defaults anywhere
    else:
        head, tail = positional, [n for n in names if n not in positional]
    listed = ", ".join([*head, *(["*", *tail] if tail else [])])
    # positional-only parameters can only be passed by position, in `forward`'s order
    by_position = [n for n in params if n in named and params[n].kind is inspect.Parameter.POSITIONAL_ONLY]
    passed = ", ".join([*by_position, *(f"{n}={n}" for n in names if n not in by_position)])
    scope: dict[str, Any] = {}
    exec(_SOURCE.format(params=listed, call=passed), scope)  # noqa: S102 (names are identifiers)
    made = scope["make"](forward, keep_types)
    inner = inspect.unwrap(forward)
    # the original's globals (fx patches its autowrapped functions there), file and line (fx
    # records them for the generated code), annotations (placeholder types) and defaults
    code, globs = made.__code__, getattr(inner, "__globals__", made.__globals__)
    if hasattr(inner, "__code__"):
        code = code.replace(co_filename=inner.__code__.co_filename, co_firstlineno=inner.__code__.co_firstlineno)
    fn = types.FunctionType(code, globs, "forward", None, made.__closure__)
    # fx makes every parameter positional, in order: a default only where all later ones have
    # one too (or are constants, which get theirs from signature.bake), as Python requires
    defaults = {n: params[n].default for n in named if params[n].default is not inspect.Parameter.empty}
    suffix: set[str] = set()
    for n in reversed(names):
        if n not in defaults and n not in arguments.constants:
            break
        suffix.add(n)
    kept = {n: v for n, v in defaults.items() if n in suffix}
    first = next((i for i in range(len(head), 0, -1) if head[i - 1] not in kept), 0)
    fn.__defaults__ = tuple(kept[n] for n in head[first:]) or None
    fn.__kwdefaults__ = {n: kept[n] for n in tail if n in kept} or None
    notes = getattr(inner, "__annotations__", {}) or {}
    fn.__annotations__ = {k: v for k, v in notes.items() if k in named or k == "return"}
    fn.__qualname__ = getattr(inner, "__qualname__", "forward")
    return fn


@contextlib.contextmanager
def traced_entry(root: nn.Module, arguments: TraceArguments | None) -> Iterator[None]:
    """While tracing, `root` (capture's own copy) is an instance of a subclass whose forward is
    the entry (:func:`_entry`); its class is put back afterwards.

    Why an entry rather than fx's own handling of the signature: fx makes one placeholder per
    parameter in signature order and one ``**kwargs`` placeholder holding a proxy, which no
    forward can unpack (``self.encoder(**kwargs)``), and it rewrites a decorated forward's code
    (``functools.wraps``, as Hugging Face's are) in a way that breaks it. Through the entry, the
    example's keys become the placeholders, ``**kwargs`` receives a real dict, and the forward
    runs as written. Why a subclass: fx traces ``type(root).forward``, and changing the model's
    own class would change every other instance of it.
    """
    if arguments is None or arguments.entry is None:
        yield
        return
    cls = type(root)
    entry = _entry(cls.forward, arguments)
    sub = type(cls)(cls.__name__, (cls,), {"forward": entry, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__})
    object.__setattr__(root, "__class__", sub)
    try:
        yield
    finally:
        object.__setattr__(root, "__class__", cls)


def entry_shell(root: nn.Module, arguments: TraceArguments) -> fx.GraphModule:
    """A GraphModule whose graph calls `root` (kept eager) as one node named ``model``, with the
    entry's parameters (a forward with ``*args``/``**kwargs`` has no placeholders of its own):
    each by keyword, each the example leaves out defaulting to its value in the forward (or in
    concrete_args)."""
    params = inspect.signature(type(root).forward).parameters
    graph = fx.Graph()
    args, kwargs = [], {}
    for name in arguments.entry or ():
        p = params.get(name)
        default = arguments.constants.get(name, p.default if p is not None else inspect.Parameter.empty)
        if name in arguments.supplied or default is inspect.Parameter.empty:
            ph = graph.placeholder(name)
        else:
            ph = graph.placeholder(name, default_value=default)
        if p is not None and p.kind is p.POSITIONAL_ONLY:
            args.append(ph)
        else:
            kwargs[name] = ph
    graph.output(graph.call_module("model", tuple(args), kwargs))
    holder = nn.Module()
    holder.model = root
    return CapturedGraphModule(holder, graph, class_name=type(root).__name__)
