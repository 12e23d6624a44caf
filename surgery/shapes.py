"""Shapes of a captured graph: :class:`ShapeProp` runs it and records every node's output
shape and dtype, :func:`annotate_shapes` does the same without computing values where that is
safe (on the meta device). Capture, compress and Shrink annotate through these.

Example::

    >>> import torch, torchvision
    >>> from surgery import capture
    >>> from surgery.shapes import annotate_shapes
    >>> gm = capture(torchvision.models.resnet18(weights=None))
    >>> annotate_shapes(gm, (torch.randn(1, 3, 64, 64),))
    >>> gm.graph.find_nodes(op="call_module", target="layer1.0.conv1")[0].meta["shape"]
    torch.Size([1, 64, 16, 16])
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.immutable_collections import immutable_dict, immutable_list

from .calling import bind_placeholders
from .copying import tree_modules
from .layers import torch_layer_subclass
from .libraries import whole_layer
from .meta import META_FUNCTIONS, META_METHODS, SHAPE_KEEPING, meta_layer, meta_shape_of, same
from .nested import recording_shapes
from .verify import eval_mode

__all__ = ["ShapeProp", "annotate_shapes", "complete_traced_shapes", "describe"]


def describe(value: Any) -> tuple[Any, Any]:
    """What ``meta["shape"]``/``meta["dtype"]`` record for a node's `value`: a tensor's shape and
    dtype, a list or tuple of tensors' shapes and first dtype, or (None, None)."""
    if isinstance(value, torch.Tensor):
        return value.shape, value.dtype
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(v.shape for v in value), value[0].dtype
    return None, None


def _plain(value: Any) -> Any:
    """fx's immutable containers (how a node's args hold list and dict literals) -> ordinary
    lists and dicts, recursively, as the generated code would pass them. Every other value, a
    model's own namedtuple, ModelOutput or list among them, passes as it is: rebuilding it as a
    plain tuple or dict would lose its type (``.last_hidden_state`` fails afterwards)."""
    t = type(value)
    if t is immutable_list:
        return [_plain(v) for v in value]
    if t is immutable_dict:
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple) and any(type(v) in _NESTED for v in value):
        items = [_plain(v) for v in value]
        return t(*items) if hasattr(t, "_fields") else t(items)
    return value


_NESTED = frozenset({tuple, immutable_list, immutable_dict})


def _meta_eligible(gm: fx.GraphModule, mods: dict[str, nn.Module]) -> bool:
    """Every module the graph calls (`mods`: by qualified name) is a torch.nn layer (no user
    code that could keep a meta tensor in its state or branch on values; a subclass that only adds
    set-up, see :func:`surgery.layers.torch_layer_subclass`), and none is an RNN
    (whose flat weight list would still hold the real tensors)."""
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = mods.get(str(n.target))
            if m is None or isinstance(m, nn.RNNBase) or \
                    not (type(m).__module__.startswith("torch.nn.") or torch_layer_subclass(type(m)) or whole_layer(m)):
                return False
    return True


def annotate_shapes(gm: fx.GraphModule, inputs: tuple | dict[str, Any]) -> None:
    """Set every node's ``meta["shape"]``/``meta["dtype"]`` for `inputs` (positional, or keyword
    by placeholder name), as ``ShapeProp(gm).propagate(*inputs)`` does, but without computing
    values where that is safe.

    When every module the graph calls is a stateless torch.nn layer, the graph runs once on
    the meta device (tensors with shapes and no data): the module tree's parameters and
    buffers are swapped for meta tensors during the run and put back after it, so nothing the
    run does can reach the real tensors. Shape-keeping layers are skipped, and convolutions,
    linear layers, adaptive average pooling and add/sub/mul get their output shapes computed
    directly (torch's meta kernels for them are slow Python). A ResNet-50 at 224 px then takes
    ~2.5 ms instead of ~57 ms (2 cores). Anything that fails on the meta device
    (an op without a meta kernel, a tensor made on the CPU inside forward, a value read back
    into Python) gets the ordinary run instead, which also raises the model's own errors.
    """
    inputs = bind_placeholders(gm.graph, inputs)
    prop = ShapeProp(gm)
    real_modules = prop.submodules
    if _meta_eligible(gm, real_modules):
        saved: list[tuple[dict, str, torch.Tensor]] = []
        try:
            for m in tree_modules(gm):
                for store in (m._parameters, m._buffers):
                    for k, t in store.items():
                        if t is not None:
                            saved.append((store, k, t))
                            store[k] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            meta_inputs = tuple(torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
                                if isinstance(x, torch.Tensor) else x for x in inputs)
            prop.submodules = {k: same if type(m) in SHAPE_KEEPING else meta_layer(m) if meta_shape_of(m)
                               else m for k, m in real_modules.items()}
            prop.functions, prop.methods = META_FUNCTIONS, META_METHODS
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prop.propagate(*meta_inputs)
            return
        except Exception:
            prop.submodules, prop.functions, prop.methods = real_modules, {}, {}  # the real run redoes every node
        finally:
            for store, k, t in saved:
                store[k] = t
    prop.propagate(*inputs)


def complete_traced_shapes(gm: fx.GraphModule, inputs: tuple | dict[str, Any]) -> bool:
    """Finish the annotation that a concrete trace (:mod:`surgery.concrete`) left, and say so.

    That trace computed every node's value on the example inputs, the value a run of the graph
    computes, and recorded its shape and dtype; running the graph again would repeat a whole
    forward (BERT-base: 0.15 s of a 0.97 s compress). Here the placeholders are described from
    `inputs` and the output from the nodes it returns, as :class:`ShapeProp` does. False, with
    nothing changed, when some node has no recorded shape (a plain fx trace, or a value the
    concrete trace could not compute): :func:`annotate_shapes` is then needed."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    if any(str(n.target).startswith("*") for n in placeholders) or \
            any("shape" not in n.meta for n in gm.graph.nodes if n.op not in ("placeholder", "output")):
        return False
    values = bind_placeholders(gm.graph, inputs)
    for i, n in enumerate(placeholders):
        n.meta["shape"], n.meta["dtype"] = describe(values[i] if i < len(values) else n.args[0] if n.args else None)
    out = gm.graph.output_node()
    returned = out.args[0]
    if isinstance(returned, fx.Node):
        out.meta["shape"], out.meta["dtype"] = returned.meta["shape"], returned.meta["dtype"]
    elif isinstance(returned, (tuple, list)) and returned and \
            all(isinstance(a, fx.Node) and isinstance(a.meta["shape"], torch.Size) for a in returned):
        out.meta["shape"], out.meta["dtype"] = tuple(a.meta["shape"] for a in returned), returned[0].meta["dtype"]
    else:
        out.meta["shape"], out.meta["dtype"] = None, None
    return True


_MISSING = object()


class ShapeProp(fx.Interpreter):
    """Run a GraphModule once and record every node's output shape and dtype.

    Sets ``node.meta["shape"]`` (a ``torch.Size``, a tuple of them for tuple outputs, or None)
    and ``node.meta["dtype"]``. Runs in eval mode under ``torch.no_grad()`` so that nothing
    in the model (BatchNorm running statistics) changes; training flags are restored.

    Example::

        >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 2))
        >>> ShapeProp(gm).propagate(torch.randn(3, 4)).shape
        torch.Size([3, 2])
    """

    #: call_function targets replaced for this run (the meta run's shape functions); empty by default
    functions: dict[Callable[..., Any], Callable[..., Any]] = {}
    #: call_method targets replaced for this run, by method name (the meta run's); empty by default
    methods: dict[str, Callable[..., Any]] = {}

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        # generated code passes fresh lists; some callees mutate theirs (swin3d's window sizes)
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _plain(args), _plain(kwargs)

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["shape"], n.meta["dtype"] = describe(result)
        return result

    def run(self, *args: Any, initial_env: dict | None = None, enable_io_processing: bool = True) -> Any:
        """fx.Interpreter.run without its per-node bookkeeping (progress bar, traceback-meta
        context managers), which costs more than the forward itself on small models. A subclass
        that overrides run_node, or a call with `initial_env`, gets fx's own loop."""
        if initial_env is not None or type(self).run_node is not ShapeProp.run_node:
            return super().run(*args, initial_env=initial_env, enable_io_processing=enable_io_processing)
        if enable_io_processing:
            args = self.graph.process_inputs(*args)
        env: dict[fx.Node, Any] = {}
        self.env = env
        arg_iter = iter(args)
        mods, fns, meths, last_uses, get = (self.submodules, self.functions, self.methods, self.user_to_last_uses,
                                            env.__getitem__)
        for n in self.graph.nodes:
            op = n.op
            try:
                if op == "placeholder":
                    if n.target.startswith("*"):
                        value = list(arg_iter)
                    else:
                        value = next(arg_iter, _MISSING)
                        if value is _MISSING:
                            if not n.args:
                                raise RuntimeError(f"expected positional argument for parameter {n.target}, "
                                                   "but one was not passed in")
                            value = n.args[0]
                elif op == "output":
                    out = _plain(fx.node.map_arg(n.args[0], get))  # the types the generated code returns
                    n.meta["shape"], n.meta["dtype"] = describe(out)
                    return self.graph.process_outputs(out) if enable_io_processing else out
                else:
                    a = _plain(fx.node.map_arg(n.args, get))
                    k = _plain(fx.node.map_arg(n.kwargs, get)) if n.kwargs else {}
                    if op == "call_module":
                        value = mods[n.target](*a, **k)
                    elif op == "call_function":
                        value = (fns.get(n.target, n.target) if fns else n.target)(*a, **k)
                    elif op == "call_method":
                        value = meths[n.target](*a, **k) if n.target in meths else getattr(a[0], n.target)(*a[1:], **k)
                    else:  # get_attr
                        value = self.fetch_attr(n.target)
            except Exception as e:
                msg = f"While executing {n.format_node()}"
                e.args = (f"{e.args[0]}\n\n{msg}" if e.args else msg,) + e.args[1:]
                if isinstance(e, KeyError):
                    raise RuntimeError(*e.args) from e
                raise
            n.meta["shape"], n.meta["dtype"] = describe(value)
            env[n] = value
            for dead in last_uses.get(n, ()):
                del env[dead]
        return None

    def propagate(self, *args: Any, **kwargs: Any) -> Any:
        """Run the graph on `args` (and `kwargs`, by placeholder name) and return its output."""
        if kwargs:
            names = [str(n.target) for n in self.graph.find_nodes(op="placeholder")]
            args = bind_placeholders(self.graph, {**dict(zip(names, args)), **kwargs})
        # graphs nested under eager code (a shell's children) record their shapes too
        with eval_mode(self.module), torch.no_grad(), recording_shapes(self.module, ShapeProp) as recording:
            return recording.returned(self.run(*args))
