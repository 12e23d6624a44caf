"""The top-level forward's arguments during capture: which ones the example inputs supply (they
stay graph inputs), which ones are traced as constants (their default, or the caller's
``concrete_args``), and which argument a failed trace or a failed shape run involves.

Example::

    >>> import torch
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x, scale=2.0, mask=None):
    ...         return x * scale if mask is None else x * scale * mask
    >>> args = bind_arguments(Net(), (torch.ones(2),), None)
    >>> args.constants
    {'scale': 2.0, 'mask': None}
"""
from __future__ import annotations

import inspect
import keyword
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from .errors import ConfigError, ShapePropagationFailure, TraceFailure

__all__ = ["TraceArguments", "bind_arguments", "bake", "annotate_inputs", "is_constant", "arguments_reaching",
           "arguments_in_failure", "control_flow_hint", "shape_failure"]

# what fx can write into generated code as a literal and compare with ``==`` in a guard (exact
# types: an Enum or a namedtuple is an object fx would have to import, not a literal)
_VAR_POSITIONAL, _VAR_KEYWORD = inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD

_CONSTANT_TYPES = frozenset({type(None), bool, int, float, complex, str,
                             torch.dtype, torch.device, torch.memory_format, torch.layout})


def is_constant(value: Any) -> bool:
    """True for what capture traces as a constant: None, numbers, bools, strings, dtypes and
    devices, and tuples/lists of those."""
    if type(value) in (tuple, list):
        return all(is_constant(v) for v in value)
    return type(value) in _CONSTANT_TYPES


@dataclass
class TraceArguments:
    """How each argument of the top-level forward is traced.

    ``supplied``: the example inputs by argument name (graph inputs). ``constants``: arguments
    traced at a fixed value; each keeps its placeholder (defaulting to that value where the
    signature allows it, see ``defaults``) behind a guard that raises if the traced module is
    called with another value. ``fx_concrete``: the caller's concrete_args that are not plain
    constants (``fx.PH`` structures, tensors), left to ``torch.fx.Tracer.trace``.
    ``entry``: the parameters of the function capture traces in place of forward, in placeholder
    order (:func:`surgery.calling.traced_entry`; keys of ``**kwargs`` included), or None to trace
    forward itself. ``keywords``: the example inputs were keywords (a dict).
    """

    owner: str
    supplied: dict[str, Any] = field(default_factory=dict)
    constants: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    fx_concrete: dict[str, Any] | None = None
    entry: tuple[str, ...] | None = None
    keywords: bool = False


def _check_key(owner: str, where: str, key: str, what: str) -> None:
    """A key that goes to ``**kwargs`` becomes a parameter of the traced entry: it must be a name."""
    if not key.isidentifier() or keyword.iskeyword(key) or key.startswith("_surgery_"):
        raise TraceFailure(owner, f"{where}: {what} {key!r} is not a valid argument name",
                           "use identifiers as keys (they become the captured module's argument names)")


def _keyword_inputs(owner: str, where: str, params: dict[str, inspect.Parameter], inputs: dict[str, Any]
                    ) -> dict[str, Any]:
    """Keyword example inputs in placeholder order: the forward's own arguments in signature
    order, then the keys that go to its ``**kwargs`` in the dict's order."""
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in inputs if k not in params or params[k].kind in (_VAR_POSITIONAL, _VAR_KEYWORD)]
    if unknown and not takes_any:
        raise TraceFailure(owner, f"example_inputs has key(s) {_listed(unknown)}, which {where} does not take",
                           "use the forward's argument names as keys (or a tuple of positional inputs)")
    for k in unknown:
        _check_key(owner, where, k, "example_inputs key")
    return {**{n: inputs[n] for n in params if n in inputs and n not in unknown}, **{k: inputs[k] for k in unknown}}


def bind_arguments(model: nn.Module, inputs: tuple | dict[str, Any] | None, concrete_args: dict | tuple | None
                   ) -> TraceArguments:
    """Match `inputs` (positional example inputs, a dict of keyword inputs, or None) and
    `concrete_args` to the signature of ``model.forward``.

    Arguments the inputs supply stay graph inputs, except a None, a bool or a string: fx cannot
    trace an ``is None`` test on a placeholder (it always takes the ``is not None`` branch), and a
    switch (``use_cache=False``) only ever steers Python, so each is traced as a constant. Arguments the inputs do not supply are traced at their default where that default
    is a constant (:func:`is_constant`), as ``torch.fx``'s ``concrete_args`` would: ``if mask is not
    None`` then takes the default branch and ``scale=2.0`` becomes a literal. A caller's
    concrete_args wins over both. Keyword inputs name forward arguments; keys the forward does
    not name go to its ``**kwargs`` (each becomes a placeholder of its own), and so do
    concrete_args it does not name. ``*args`` and ``**kwargs`` receive nothing else: the traced
    entry (``entry``) leaves them out. Without an entry (positional inputs that spill into
    ``*args``, or no inputs and a forward with ``*args``/``**kwargs``) they are left to fx.

    Raises TraceFailure for an argument without a default that is neither supplied nor given
    in concrete_args (only when `inputs` is given: without inputs, the caller supplies it when
    running the module), for more inputs than the forward takes and for keys it does not take;
    ConfigError for a concrete_args name the forward does not have.
    """
    owner = type(model).__name__
    try:  # the class's forward, less `self`: what fx traces
        sig = inspect.signature(type(model).forward)
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    except (TypeError, ValueError):  # a builtin forward: nothing to match, fx decides
        return TraceArguments(owner, fx_concrete=concrete_args or None)
    params = list(sig.parameters.values())
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    positional = [p for p in named if p.kind != p.KEYWORD_ONLY]
    var_names = {("*" if p.kind == p.VAR_POSITIONAL else "**") + p.name for p in params if p not in named}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
    where = f"{owner}.forward{sig}"
    if isinstance(concrete_args, tuple):  # fx's positional form: one value per named argument
        if len(concrete_args) != len(named):
            raise ConfigError("capture", "concrete_args", concrete_args,
                              f"a tuple needs one value per argument of {where} ({len(named)})")
        concrete_args = dict(zip((p.name for p in named), concrete_args))
    concrete = dict(concrete_args or {})
    for name in concrete:
        if name not in sig.parameters and name not in var_names and not takes_any:
            raise ConfigError("capture", "concrete_args", name, f"not an argument of {where}")
    given, keywords = inputs is not None, isinstance(inputs, dict)
    if keywords:
        out = TraceArguments(owner, supplied=_keyword_inputs(owner, where, dict(sig.parameters), inputs), keywords=True)
        inputs = ()
    else:
        inputs = inputs or ()
        if len(inputs) > len(positional) and not any(p.kind == p.VAR_POSITIONAL for p in params):
            raise TraceFailure(owner, f"{where} takes {len(positional)} positional argument(s) but "
                               f"example_inputs has {len(inputs)}",
                               "pass only the forward's positional inputs as example_inputs")
        if len(inputs) > len(positional) and len(named) > len(positional):
            # fx writes keyword-only arguments as positional parameters ahead of *args: the extra
            # inputs would land in them instead
            raise TraceFailure(owner, f"{where}: inputs past the first {len(positional)} go to *args, which the "
                               "traced module takes only after the keyword-only arguments",
                               "wrap the model in a module whose forward names every input")
        out = TraceArguments(owner, supplied={p.name: v for p, v in zip(positional, inputs)})
    # keys for **kwargs, supplied or concrete: arguments without a default, as far as tracing goes
    var_keys = [k for k in out.supplied if k not in sig.parameters]
    var_keys += [k for k in concrete if k not in sig.parameters and k not in var_names and k not in var_keys]
    for k in var_keys:
        _check_key(owner, where, k, "concrete_args name")
    extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in var_keys]
    for p in [*named, *extra]:
        if p.name in concrete:
            value = concrete.pop(p.name)
            shown = out.supplied.get(p.name)
            if p.name in out.supplied and is_constant(shown) and is_constant(value) and shown != value:
                raise ConfigError("capture", f"concrete_args[{p.name!r}]", value,
                                  f"example_inputs supplies {p.name!r} = {shown!r}: give one value")
            if is_constant(value):
                out.constants[p.name] = value
            else:
                out.fx_concrete = {**(out.fx_concrete or {}), p.name: value}
        elif p.name in out.supplied:
            # None, a bool or a string is a switch (use_cache=False, return_dict=True): no graph can
            # branch on an input, so it is traced as the constant it is, behind a guard
            if out.supplied[p.name] is None or isinstance(out.supplied[p.name], (bool, str)):
                out.constants[p.name] = out.supplied[p.name]
        elif p.default is not p.empty:
            if is_constant(p.default):
                out.constants[p.name] = p.default
            # any other default (a tensor, an object) stays a placeholder with that default, as before
        elif given:
            shown = f"keys {_listed(out.supplied)}" if keywords else f"{len(inputs)} positional"
            raise TraceFailure(owner, f"{where} needs argument {p.name!r}, which example_inputs "
                               f"({shown}) does not supply and which has no default",
                               f"add {p.name!r} to example_inputs, or pass concrete_args={{{p.name!r}: <value>}}")
    if concrete:  # what is left names *args/**kwargs: fx's to handle
        out.fx_concrete = {**(out.fx_concrete or {}), **concrete}
    order = [*named, *extra]
    if keywords:  # the supplied arguments first: the captured module then takes them positionally too
        order = [p for p in order if p.name in out.supplied] + [p for p in order if p.name not in out.supplied]
    # without an entry: inputs for *args, concrete_args fx must place, or no inputs to say what a
    # forward with *args/**kwargs receives (fx then gives each a placeholder, as it always has)
    spills = len(inputs) > len(positional) or bool(concrete) or (not given and len(named) < len(params) and not extra)
    if not spills:
        out.entry = tuple(p.name for p in order)
    elif keywords or extra:
        raise TraceFailure(owner, f"{where}: concrete_args for *args/**kwargs cannot be combined with keyword "
                           "inputs or keys for **kwargs", "pass every input by name")
    # a constant's placeholder defaults to its value, so the traced module runs without it, except
    # before an argument without a default: fx writes every named argument, keyword-only ones
    # too, as a positional parameter of the generated forward, and Python forbids that order
    tail_free = True
    for p in reversed(order if out.entry else named):
        # a supplied switch (use_cache=False) defaults to its traced value too: callers may omit it
        tail_free = tail_free and (p.name in out.constants or p.name not in out.supplied and p.default is not p.empty)
        if tail_free and p.name in out.constants:
            out.defaults[p.name] = out.constants[p.name]
    return out


def _is_none(value: Optional[torch.Tensor]) -> bool:
    """The guard of an argument traced as None. Typed, so that TorchScript scripts it
    (``operator.is_`` is a Python builtin it does not support); recorded as a node when the
    generated code is traced again (unpickling a GraphModule does), where ``is`` would decide."""
    if not torch.jit.is_scripting():
        if isinstance(value, fx.Proxy):
            return value.tracer.create_proxy("call_function", _is_none, (value,), {})
    return value is None


def _annotation(value: Any) -> Any:
    """The type TorchScript needs to script a parameter holding `value` (None: no annotation)."""
    if type(value) in (bool, int, float, str, torch.dtype, torch.device):
        return type(value)
    items = [_annotation(v) for v in value] if type(value) in (tuple, list) and value else [None]
    if None in items:
        return None
    if type(value) is tuple:
        return Tuple[tuple(items)]
    return List[items[0]] if len(set(items)) == 1 else None


def annotate_inputs(graph: fx.Graph, arguments: TraceArguments | None) -> bool:
    """Type each placeholder that an example input supplies as a Python value (a float scale, a
    flag) and the forward leaves unannotated: TorchScript takes an unannotated parameter for a
    Tensor, and the captured module would not script. True when any changed (regenerate the code)."""
    changed = False
    for n in graph.find_nodes(op="placeholder") if arguments is not None else ():
        value = arguments.supplied.get(str(n.target))
        if n.type is None and value is not None and str(n.target) not in arguments.constants:
            n.type = _annotation(value)
            changed = changed or n.type is not None
    return changed


def bake(tracer: fx.Tracer, args: list, arguments: TraceArguments) -> list:
    """In `args` (what ``Tracer.create_args_for_root`` hands the forward), replace the
    placeholder proxy of every constant argument by its value.

    The placeholder stays, so the traced module keeps the forward's signature, and feeds a
    ``torch._assert`` guard: calling the module with another value raises instead of silently
    computing the branch traced for this one.
    """
    out = list(args)
    for i, a in enumerate(out):
        if not (isinstance(a, fx.Proxy) and a.node.op == "placeholder" and a.node.target in arguments.constants):
            continue
        name = str(a.node.target)
        value = arguments.constants[name]
        if name in arguments.defaults:
            a.node.args = (value,)
        # annotations let TorchScript script the module (an unannotated parameter is a Tensor there);
        # one traced as None accepts nothing else, so Optional[Tensor] types its guard whatever it was
        if value is None:
            a.node.type = Optional[torch.Tensor]
            test = tracer.create_proxy("call_function", _is_none, (a,), {})  # `==` on a tensor is elementwise
        else:
            if a.node.type is None:
                a.node.type = _annotation(value)
            test = tracer.create_proxy("call_function", operator.eq, (a, value), {})
        tracer.create_proxy("call_function", torch._assert,
                            (test, f"{name} was traced as {value!r}: capture again with "
                                   f"concrete_args={{{name!r}: <value>}} to trace another value"), {})
        out[i] = value
    return out


def arguments_reaching(nodes: Iterable[fx.Node]) -> list[str]:
    """The forward arguments (placeholder names, in signature order) that `nodes` depend on."""
    seen: set[fx.Node] = set()
    stack, found = list(nodes), []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            found.append(n)
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(n for n in (found[0].graph.nodes if found else ()) if n.op == "placeholder")}
    return [str(n.target).lstrip("*") for n in sorted(found, key=order.__getitem__)]


_PROXY = re.compile(r"(?<!\w)Proxy\((\w+)\)")  # fx's repr of a proxy (not a ParameterProxy's)


def arguments_in_failure(graph: fx.Graph | None, error: BaseException, nodes: Iterable[fx.Node] = ()) -> list[str]:
    """The forward arguments a failed trace involves: those reaching `nodes` (the proxies the
    tracer was asked to branch on or iterate) or a proxy the error message names."""
    by_name = {n.name: n for n in graph.nodes} if graph is not None else {}
    named = [by_name[m] for m in _PROXY.findall(str(error)) if m in by_name]
    return arguments_reaching([*nodes, *named])


def _suggestion(names: list[str], supplied: dict[str, Any]) -> str:
    shown = ", ".join(f"{n!r}: {supplied[n]!r}" if n in supplied and is_constant(supplied[n]) else f"{n!r}: <value>"
                      for n in names)
    return f"concrete_args={{{shown}}}"


def _listed(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)


def control_flow_hint(names: list[str], arguments: TraceArguments | None) -> str:
    """The fix to try when the forward branches on (or iterates) arguments `names`."""
    if not names:
        return ""
    supplied = arguments.supplied if arguments else {}
    hint = (f"the forward's control flow depends on argument(s) {_listed(names)}: pass {_suggestion(names, supplied)} "
            "to trace the branch one value takes (the traced module then accepts only that value), or leaf_modules= "
            "to keep the submodule that branches opaque")
    tensors = [n for n in names if isinstance(supplied.get(n), torch.Tensor)]
    if tensors:
        hint += (f"; {_listed(tensors)}: a tensor, and no graph can branch on tensor data, so keeping the code that "
                 "branches opaque (leaf_modules=, torch.fx.wrap) is the usual fix")
    return hint


_EXECUTING = re.compile(r"While executing %(\w+)")


def shape_failure(gm: fx.GraphModule, error: BaseException, arguments: TraceArguments | None) -> ShapePropagationFailure:
    """`error` (raised by the shape run over `gm`, which names the node it was executing) as a
    ShapePropagationFailure naming the node, its module and the arguments feeding it."""
    match = _EXECUTING.search(str(error))
    node = next((n for n in gm.graph.nodes if match and n.name == match.group(1)), None)
    owner = arguments.owner if arguments else type(gm).__name__
    if node is None:
        return ShapePropagationFailure(owner, None, error)
    if node.op == "call_module":
        module = str(node.target)
    else:  # the innermost module whose forward made the node (none: the top-level forward)
        stack = node.meta.get("nn_module_stack") or {}
        module = next(reversed(stack.values()))[0] if stack else ""
    supplied = arguments.supplied if arguments else {}
    # the arguments that feed the node directly: every node depends on the main input indirectly
    names = [str(a.target).lstrip("*") for a in node.all_input_nodes if a.op == "placeholder"]
    tensors = {n: supplied[n] for n in names if isinstance(supplied.get(n), torch.Tensor)}
    others = [n for n in names if n in supplied and n not in tensors]  # a default is rarely what went wrong
    hints = []
    if tensors:
        shown = ", ".join(f"{n!r} (shape {tuple(t.shape)}, {t.dtype})" for n, t in tensors.items())
        hints.append(f"check the example input(s) {shown} against what {module or owner!r} expects")
    if others:
        hints.append(f"argument(s) {_listed(others)} feed this node: check their example values, or pass "
                     f"{_suggestion(others, supplied)} to trace them as constants")
    if module and not names:
        hints.append(f"leaf_modules=[{module!r}] keeps the module opaque, where its forward cannot be traced exactly")
    return ShapePropagationFailure(module or owner, node.name, error, "; ".join(hints))
