"""Shape-concrete tracing: concrete values beside the proxies, so a forward that asks Python
questions about sizes still traces.

torch.fx traces with proxies that know nothing of the values they stand for, so
``hidden_shape = (*x.shape[:-1], -1, self.head_dim)`` (iterating a shape),
``for i in range(x.size(1))`` or ``if x.size(1) > 512:`` stop the trace. Here every node
created during the trace is also run on the example inputs (the idea of NNI's
``concrete_trace`` and of Hugging Face's old fx tracer), and the tracer answers such questions
from those values:

- iterating a proxy (a shape, a tuple, a tensor) yields one ``getitem`` node per element, so
  ``view(*x.shape[:-1], -1, d)`` stays symbolic: the graph reads the sizes at run time;
- a proxy used as a Python int (``range(n)``, ``len(x)``), a Python bool (``if``) or a dict
  (``**kw``) takes its concrete value, and a ``torch._assert`` guard records it: run at an input
  where the answer differs, the captured module raises naming the guard instead of computing
  the branch it did not trace;
- ``x.dtype``, ``x.device``, ``x.ndim`` and ``x.dim()`` are the example's: they do not change
  with the sizes of the inputs.

Guards are listed in ``gm.meta["surgery"]["guards"]``, and the input dims they hold fixed in
``gm.meta["surgery"]["specialised"]`` (input name -> dims; see :func:`specialised_dims`).
Values are computed without autograd, leaf modules run in eval mode, and tensors read with
get_attr are cloned first: the trace never changes the model. Where a value cannot be
computed, the proxy behaves as in plain fx.
"""
from __future__ import annotations

import builtins
import operator
import types
import weakref
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from .codelines import caller_line
from .data_sizes import from_sizes, shaped_by_data
from .shapes import describe
from .trace_effects import modules_kept, traced_torch

__all__ = ["ConcreteTracing", "ConcreteProxy", "sizes_read", "specialised_dims"]

_MISSING = object()
# attributes and methods that do not change with the inputs' sizes: answered from the example
_STATIC_ATTRS = frozenset({"dtype", "device", "ndim", "is_cuda", "is_sparse", "is_quantized", "layout",
                           "requires_grad", "is_meta"})
_STATIC_METHODS = frozenset({"dim", "ndimension", "is_floating_point", "is_complex", "get_device",
                             "element_size", "is_contiguous"})


def _getattr_path(root: Any, target: str) -> Any:
    """The attribute at dotted `target` of `root`, read from modules' own tables where it is
    there (no ``nn.Module.__getattr__``, which fx patches while tracing), else with getattr."""
    for part in target.split("."):
        d = root.__dict__ if hasattr(root, "__dict__") else {}
        for table in ("_parameters", "_buffers", "_modules"):
            if part in d.get(table, ()):
                root = d[table][part]
                break
        else:
            root = getattr(root, part)
    return root


class ConcreteProxy(fx.Proxy):
    """A proxy that can answer with its node's concrete value (see the module docstring)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # protocol probes (__array__, __cuda_array_interface__...): not a tensor
            raise AttributeError(name)
        if "tracer" not in self.__dict__:
            return super().__getattr__(name)  # copying and unpickling look before __init__
        if name in _STATIC_ATTRS:
            value = self.tracer.value_of(self)
            if value is not _MISSING and hasattr(value, name):
                return getattr(value, name)
        return ConcreteAttribute(self, name)

    def __len__(self) -> int:
        value = self.tracer.value_of(self)
        if value is _MISSING or not hasattr(value, "__len__") or self.node in self.tracer.__dict__.get("by_data", ()):
            return super().__len__()  # unknown, or a count of what tensor data let through
        n = len(value)
        if isinstance(value, torch.Tensor):  # a shape's or a tuple's length is fixed by the code
            self.tracer.guard(self.tracer.create_proxy("call_function", builtins.len, (self,), {}), n, "len")
        return n

    def __index__(self) -> int:
        return self.tracer.as_python(self, int)

    def __int__(self) -> int:
        return self.tracer.as_python(self, int)

    def __float__(self) -> float:
        return self.tracer.as_python(self, float)

    def __iter__(self) -> Iterator:
        return self.tracer.iter(self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # a proxy looks callable to ``callable()`` whatever it holds; Hugging Face's checks then
        # call a condition (``if callable(cond): cond = cond()``): a value known not to be callable
        # is what eager code would have kept
        if isinstance(self, fx.proxy.Attribute) or "tracer" not in self.__dict__:
            return super().__call__(*args, **kwargs)  # x.relu(): a method call, no getattr node
        value = self.tracer.value_of(self)
        if value is not _MISSING and not callable(value) and not args and not kwargs:
            return self
        return super().__call__(*args, **kwargs)

    def __setitem__(self, key: Any, value: Any) -> None:
        # ``boxes[..., :2] += reference`` (Conditional and Deformable DETR): one in-place node,
        # computed on the concrete value as eager code would (see surgery.inplace)
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class ConcreteAttribute(ConcreteProxy, fx.proxy.Attribute):
    """``proxy.shape`` and friends: fx's lazy attribute proxy, with the concrete answers."""

    @property
    def node(self) -> fx.Node:
        # fx's makes the getattr node's proxy and keeps only the node; keeping the proxy keeps
        # the node's value (a tensor attribute's, ``x.mT``) for as long as this attribute lives
        if self._node is None:
            self._made = self.tracer.create_proxy("call_function", getattr, (self.root, self.attr), {})
            self._node = self._made.node
        return self._node


# torch's factory functions parse sizes before __torch_function__ can see a proxy among them
# (torch.ones(b, s) with b, s read from a shape): during a trace they record a node instead
def _size_read(node: fx.Node) -> tuple[fx.Node, tuple[int, ...] | None] | None:
    """(tensor, dims) when `node` reads sizes of a tensor: ``x.shape``/``x.size()`` (dims None: every
    one), ``x.size(d)``, ``len(x)`` (dim 0), ``x.numel()`` (every dim); else None."""
    a = node.args
    if node.op == "call_function" and node.target is getattr and len(a) > 1 and a[1] == "shape" or \
            node.op == "call_method" and node.target in ("size", "numel") and len(a) == 1 and not node.kwargs:
        return (a[0], None) if isinstance(a[0], fx.Node) else None
    if node.op == "call_method" and node.target == "size" and isinstance(a[0], fx.Node):
        d = a[1] if len(a) > 1 else node.kwargs.get("dim")
        return (a[0], (d,)) if isinstance(d, int) else (a[0], None)
    if node.op == "call_function" and node.target is builtins.len and isinstance(a[0], fx.Node):
        return a[0], (0,)
    return None


def sizes_read(node: fx.Node) -> dict[fx.Node, set[int | None]]:
    """The tensors whose sizes `node`'s value was computed from, each with the dims read (None
    for all of them, or a dim counted as written: negative from the end)."""
    found: dict[fx.Node, set[int | None]] = {}
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        read = _size_read(n)
        if read is not None:
            found.setdefault(read[0], set()).update(read[1] or (None,))
            continue
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
            read = _size_read(n.args[0])
            if read is not None and read[1] is None and isinstance(n.args[1], int):
                found.setdefault(read[0], set()).add(n.args[1])
                continue
        todo.extend(n.all_input_nodes)
    return found


class ConcreteTracing:
    """Mixin for an ``fx.Tracer`` subclass: compute each node's value while tracing and answer
    size questions from it. Enabled by ``self.example`` (argument name -> example value, set
    before ``trace``); with it None, tracing is plain fx."""

    example: dict[str, Any] | None = None
    computing = False  # True while a node's value is computed (see _compute)

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        with traced_torch(self), modules_kept(root):
            return super().trace(root, concrete_args)

    def value_of(self, proxy: fx.Proxy) -> Any:
        return self.__dict__.setdefault("values", {}).get(proxy.node, _MISSING)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self) if self.example is not None else super().proxy(node)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any | None = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        if self.example is not None and kind == "call_method" and target in _STATIC_METHODS and args and \
                isinstance(args[0], fx.Proxy):
            value = self.value_of(args[0])
            if value is not _MISSING:
                return getattr(value, target)(*args[1:], **kwargs)  # a plain Python value, no node
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.example is not None and isinstance(p, fx.Proxy):
            value = self._compute(kind, target, args, kwargs, p.node)
            if value is not _MISSING:
                self._keep(p, value)
                if shaped_by_data(kind, target, args, kwargs, self.__dict__.setdefault("by_data", set())):
                    self.by_data.add(p.node)
                sized = self.__dict__.setdefault("sized", set())
                if from_sizes(kind, target, args, kwargs, value, sized, self.by_data):
                    sized.add(p.node)
        return p

    def create_arg(self, a: Any) -> Any:
        out = super().create_arg(a)
        if self.example is not None and isinstance(a, torch.Tensor) and isinstance(out, fx.Node):
            out.meta["shape"], out.meta["dtype"] = describe(a)  # a tensor constant's get_attr: `a` is its value
        return out

    def _keep(self, proxy: fx.Proxy, value: Any) -> None:
        """Hold `proxy`'s node's value while the proxy lives. Later code reads a value only through
        a proxy of its node, so a tensor is dropped with its proxy, as an eager forward drops it,
        not at the trace's end: holding every activation of swin3d_t's 16x224x224 clip took 3.3 GB
        at once, against 0.4 GB for an eager forward. Its shape and dtype stay in the node's meta,
        as a run of the graph records them (see :func:`surgery.shapes.complete_traced_shapes`)."""
        values = self.__dict__.setdefault("values", {})
        values[proxy.node] = value
        proxy.node.meta["shape"], proxy.node.meta["dtype"] = describe(value)
        if isinstance(value, torch.Tensor):
            # the weak references live in the tracer: once the trace's state goes, so do they
            self.__dict__.setdefault("lifetimes", []).append(
                weakref.ref(proxy, lambda _, node=proxy.node: values.pop(node, None)))

    def _compute(self, kind: str, target: Any, args: tuple, kwargs: dict, node: fx.Node) -> Any:
        if kind == "placeholder":
            return self.example.get(str(target), _MISSING)
        missing = False

        def concrete(a: Any) -> Any:
            nonlocal missing
            if isinstance(a, fx.Proxy):
                v = self.value_of(a)
                missing = missing or v is _MISSING
                return v
            return a

        a = map_aggregate(args, concrete)
        kw = map_aggregate(kwargs, concrete)
        if missing:
            return _MISSING
        if kind == "get_attr":  # read from the modules' tables: no patched __getattr__ on the way
            value = _getattr_path(self.root, str(target))
            return value.detach().clone() if isinstance(value, torch.Tensor) else value
        if kind == "call_method" or kind == "call_function" and _plain_function(target):
            try:  # a tensor method or a torch/operator function calls no module: fx's patches are harmless
                with torch.no_grad():
                    return target(*a, **kw) if kind == "call_function" else getattr(a[0], target)(*a[1:], **kw)
            except Exception:
                return _MISSING
        # fx's patches (Module.__call__, __getattr__) would trace these calls: while `computing`,
        # call_module and getattr below hand back the real thing instead (reverting the patches
        # would set attributes on nn.Module, which invalidates the type caches of every subclass
        # loaded: about 1 ms a node with transformers imported); wrapped functions see no proxy
        was_computing, self.computing = self.computing, True
        try:
            with torch.no_grad():
                if kind == "call_function":
                    return target(*a, **kw)
                if kind == "call_method":
                    return getattr(a[0], target)(*a[1:], **kw)
                if kind == "call_module":
                    module = self.root.get_submodule(str(target))
                    was = module.training
                    module.train(False)
                    try:
                        return module(*a, **kw)
                    finally:
                        module.train(was)
        except Exception:  # a value we cannot compute: that node behaves as in plain fx
            return _MISSING
        finally:
            self.computing = was_computing
        return _MISSING

    def call_module(self, m: Any, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self.computing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        if self.computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # --- the questions fx refuses to answer
    def _guard_node(self, target: Any, args: tuple, value: Any) -> fx.Proxy:
        """A guard's own call node (test, assert) as plain fx makes it, described by its value (see _keep)."""
        p = super().create_proxy("call_function", target, args, {})
        p.node.meta["shape"], p.node.meta["dtype"] = describe(value)
        return p

    def guard(self, proxy: fx.Proxy, value: Any, what: str) -> None:
        """Record that `proxy` was traced as `value`: a torch._assert node and a meta entry."""
        was = self.value_of(proxy)
        test = self._guard_node(operator.eq, (proxy, value), was == value if isinstance(was, torch.Tensor) else True)
        self._assert(test, f"{what} {proxy.node.name} was traced as {value!r}", "inputs of these sizes")

    def _assert(self, test: fx.Proxy, text: str, fix: str) -> None:
        text += f" at {caller_line()}"
        self._guard_node(torch._assert, (test, f"surgery guard: {text}; capture again with {fix}"), None)
        self.__dict__.setdefault("guards", []).append(text)
        specialised = self.__dict__.setdefault("specialised", {})
        for tensor, dims in sizes_read(test.node).items():
            specialised.setdefault(tensor, set()).update(dims)

    def as_python(self, proxy: fx.Proxy, kind: type) -> Any:
        value = self.value_of(proxy)
        if value is _MISSING or proxy.node not in self.__dict__.get("sized", ()):
            raise fx.proxy.TraceError(f"symbolically traced variable {proxy.node.name!r} cannot be used as a "
                                      f"Python {kind.__name__} (its value is unknown or read from tensor data)")
        out = kind(value)
        self.guard(proxy, out, kind.__name__)
        return out

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.value_of(obj) if self.example is not None else _MISSING
        if value is _MISSING or obj.node not in self.__dict__.get("sized", ()):
            return super().to_bool(obj)  # unknown, or read from tensor data: fx's refusal stands
        out = bool(value)
        test = obj if out else self._guard_node(operator.not_, (obj,), True)
        self._assert(test, f"condition {obj.node.name} was traced as {out}", "inputs that take this branch")
        return out

    def iter(self, obj: fx.Proxy) -> Iterator:
        value = self.value_of(obj) if self.example is not None else _MISSING
        if value is _MISSING or not hasattr(value, "__len__") or isinstance(value, torch.Tensor) and value.dim() == 0:
            return super().iter(obj)
        n = len(value)
        if not isinstance(value, (torch.Size, tuple, list)) or obj.node.op == "placeholder":
            # a tensor's first size, an input list's length (a tuple's made in the code is fixed)
            self.guard(self._guard_node(builtins.len, (obj,), n), n, "len")
        return iter([obj[i] for i in range(n)])

    def keys(self, obj: fx.Proxy) -> Any:
        value = self.value_of(obj) if self.example is not None else _MISSING
        if isinstance(value, dict):
            return value.keys()
        return super().keys(obj)


def specialised_dims(specialised: dict[fx.Node, set[int | None]]) -> dict[str, list[int] | str]:
    """What a trace's guards fixed, for ``meta["surgery"]["specialised"]``: input name -> the
    dims (counted from 0) whose size a guard holds; a tensor made inside the graph is named by
    its node and its example shape (``"transpose [2, 12, 9, 64] (inside the graph)": [2]``: the
    model read the size of an intermediate tensor, here the sequence length; shapes as _keep recorded them)."""
    out: dict[str, Any] = {}
    for tensor, dims in specialised.items():
        shape_of = tensor.meta.get("shape")
        shape_of = shape_of if isinstance(shape_of, torch.Size) else None
        rank = len(shape_of) if shape_of is not None else None
        if None in dims or rank is None:
            listed: list[int] | str = list(range(rank)) if rank is not None else "all"
        else:
            listed = sorted({d % rank if rank else d for d in dims if isinstance(d, int)})
        shape = f" {list(shape_of)}" if shape_of is not None else ""
        key = str(tensor.target) if tensor.op == "placeholder" else f"{tensor.name}{shape} (inside the graph)"
        out[key] = listed
    return out


_PLAIN_MODULES = ("torch.nn.functional", "torch.functional", "_operator", "operator", "math", "torch._C")


def _plain_function(target: Any) -> bool:
    """A function that computes on its arguments and calls no module, so it may run while fx's
    patches are in place (undoing and redoing them sets class attributes of nn.Module, which
    invalidates Python's type caches: most of a concrete trace's time when done for every op):
    a builtin (torch's C functions, operator's), or one from torch.nn.functional, torch.functional
    or math."""
    if isinstance(target, types.BuiltinFunctionType):
        return True
    module = getattr(target, "__module__", None) or ""
    return module in _PLAIN_MODULES
