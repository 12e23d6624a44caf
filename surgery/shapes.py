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

import operator
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F
from torch.fx.immutable_collections import immutable_dict, immutable_list

from .calling import bind_placeholders
from .layers import torch_layer_subclass
from .libraries import whole_layer
from .nested import recording_shapes
from .verify import eval_mode

__all__ = ["ShapeProp", "annotate_shapes"]


def _describe(value: Any) -> tuple[Any, Any]:
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


# modules whose output has their (single) input's shape and dtype, by exact class: a subclass may
# override forward. The meta shape run skips them (their meta kernels are slow Python decompositions).
_SHAPE_KEEPING = frozenset({
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softmax, nn.LogSoftmax,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
})


def _same(x: Any, *args: Any, **kwargs: Any) -> Any:
    return x


# Output shapes computed in Python for the meta run, where torch's meta kernels are slow Python
# decompositions (an elementwise add or an adaptive pooling ~0.15-0.2 ms, a convolution ~40 us:
# in a squeeze-excite network they cost more than the real layers). Each returns None when its
# input is anything but the plain case (wrong channel count, odd dtype): the layer itself then
# runs on meta, so bad input still fails the way it fails for real.

def _meta_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def _conv_shape(m: nn.Module, x: Any) -> torch.Tensor | None:
    d = len(m.kernel_size)
    if (not isinstance(x, torch.Tensor) or x.dim() not in (d + 1, d + 2) or x.shape[-d - 1] != m.in_channels
            or x.dtype != m.weight.dtype):
        return None
    if m.padding == "same":
        spatial = list(x.shape[-d:])
    else:
        pad = (0,) * d if m.padding == "valid" else m.padding
        spatial = [(n + 2 * p - dil * (k - 1) - 1) // s + 1
                   for n, p, dil, k, s in zip(x.shape[-d:], pad, m.dilation, m.kernel_size, m.stride)]
        if min(spatial) <= 0:
            return None
    return _meta_empty((*x.shape[:-d - 1], m.out_channels, *spatial), x.dtype)


def _linear_shape(m: nn.Module, x: Any) -> torch.Tensor | None:
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != m.in_features or x.dtype != m.weight.dtype:
        return None
    return _meta_empty((*x.shape[:-1], m.out_features), x.dtype)


def _adaptive_avg_shape(m: nn.Module, x: Any) -> torch.Tensor | None:
    d = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}[type(m)]
    if (not isinstance(x, torch.Tensor) or x.dim() not in (d + 1, d + 2) or not x.is_floating_point()
            or 0 in x.shape[1:]):
        return None
    size = (m.output_size,) * d if isinstance(m.output_size, int) else tuple(m.output_size)
    if len(size) != d:
        return None
    return _meta_empty((*x.shape[:-d], *(n if o is None else o for n, o in zip(x.shape[-d:], size))), x.dtype)


def _norm_shape(m: nn.Module, x: Any) -> torch.Tensor | None:
    """A batch, layer or group norm keeps its input's shape, where its tables fit the input."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    if isinstance(m, nn.LayerNorm):
        d = len(m.normalized_shape)
        fits = 0 < d <= x.dim() and tuple(x.shape[-d:]) == tuple(m.normalized_shape)
    elif isinstance(m, nn.GroupNorm):
        fits = x.dim() >= 2 and x.shape[1] == m.num_channels
    else:
        ranks = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}
        dims = next((ranks[c] for c in type(m).__mro__ if c in ranks), range(2, 9))  # timm's BatchNormAct2d: 4
        fits = x.dim() in dims and x.shape[1] == m.num_features
    return _meta_empty(x.shape, x.dtype) if fits else None


_META_SHAPES: dict[type, Callable[[nn.Module, Any], torch.Tensor | None]] = {
    **dict.fromkeys((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm),
                    _norm_shape),
    nn.Conv1d: _conv_shape, nn.Conv2d: _conv_shape, nn.Conv3d: _conv_shape, nn.Linear: _linear_shape,
    nn.AdaptiveAvgPool1d: _adaptive_avg_shape, nn.AdaptiveAvgPool2d: _adaptive_avg_shape,
    nn.AdaptiveAvgPool3d: _adaptive_avg_shape,
}


def _meta_shape_of(m: nn.Module) -> Callable[[nn.Module, Any], torch.Tensor | None] | None:
    """How the meta run computes `m`'s output shape: by its exact class, or as a norm for the
    library norm-activation layers capture keeps whole (element-wise after the norm)."""
    return _META_SHAPES.get(type(m)) or (_norm_shape if whole_layer(m) else None)


def _meta_layer(m: nn.Module) -> Callable[..., Any]:
    """`m` for the meta run: its output shape computed directly where that is plain."""
    shape_of = _meta_shape_of(m)

    def run(x: Any, *args: Any, **kwargs: Any) -> Any:
        out = None if args or kwargs else shape_of(m, x)
        return m(x, *args, **kwargs) if out is None else out
    return run


_NUMBER = (bool, int, float, complex)


def _meta_binary(op: Callable[..., Any]) -> Callable[..., Any]:
    """`op` (add, sub, mul) for the meta run: a broadcast shape and a promoted dtype."""
    def run(*args: Any, **kwargs: Any) -> Any:
        if len(args) == 2 and not kwargs:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if (tensors and all(t.device.type == "meta" and t.dtype != torch.bool for t in tensors)
                    and all(isinstance(a, (torch.Tensor, *_NUMBER)) for a in args)):
                return _meta_empty(torch.broadcast_shapes(*(t.shape for t in tensors)), torch.result_type(*args))
        return op(*args, **kwargs)
    return run


def _meta_batch_norm(x: Any, *tables: Any, **kwargs: Any) -> Any:
    """F.batch_norm for the meta run (torch's meta kernel is a Python decomposition, ~1.4 ms):
    the input's shape where every per-channel table matches its channel count."""
    given = [t for t in (*tables[:4], *(kwargs.get(k) for k in ("running_mean", "running_var", "weight", "bias")))
             if isinstance(t, torch.Tensor)]
    if (isinstance(x, torch.Tensor) and x.device.type == "meta" and x.dim() >= 2 and x.is_floating_point()
            and all(t.shape == (x.shape[1],) for t in given)):
        return _meta_empty(x.shape, x.dtype)
    return F.batch_norm(x, *tables, **kwargs)


def _meta_layer_norm(x: Any, normalized_shape: Any, *tables: Any, **kwargs: Any) -> Any:
    """F.layer_norm for the meta run: the input's shape where the normalised shape fits it."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    given = [t for t in (*tables[:2], *(kwargs.get(k) for k in ("weight", "bias"))) if isinstance(t, torch.Tensor)]
    if (isinstance(x, torch.Tensor) and x.device.type == "meta" and x.is_floating_point() and 0 < len(shape) <= x.dim()
            and tuple(x.shape[-len(shape):]) == shape and all(tuple(t.shape) == shape for t in given)):
        return _meta_empty(x.shape, x.dtype)
    return F.layer_norm(x, normalized_shape, *tables, **kwargs)


_META_FUNCTIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    **{f: _meta_binary(f) for f in (operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul)},
    F.batch_norm: _meta_batch_norm, F.layer_norm: _meta_layer_norm}


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
            for m in gm.modules():
                for store in (m._parameters, m._buffers):
                    for k, t in store.items():
                        if t is not None:
                            saved.append((store, k, t))
                            store[k] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            meta_inputs = tuple(torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
                                if isinstance(x, torch.Tensor) else x for x in inputs)
            prop.submodules = {k: _same if type(m) in _SHAPE_KEEPING else _meta_layer(m) if _meta_shape_of(m)
                               else m for k, m in real_modules.items()}
            prop.functions = _META_FUNCTIONS
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prop.propagate(*meta_inputs)
            return
        except Exception:
            prop.submodules, prop.functions = real_modules, {}  # the real run below redoes every node
        finally:
            for store, k, t in saved:
                store[k] = t
    prop.propagate(*inputs)


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

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        # generated code passes fresh lists; some callees mutate theirs (swin3d's window sizes)
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return _plain(args), _plain(kwargs)

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["shape"], n.meta["dtype"] = _describe(result)
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
        mods, fns, last_uses, get = self.submodules, self.functions, self.user_to_last_uses, env.__getitem__
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
                    n.meta["shape"], n.meta["dtype"] = _describe(out)
                    return self.graph.process_outputs(out) if enable_io_processing else out
                else:
                    a = _plain(fx.node.map_arg(n.args, get))
                    k = _plain(fx.node.map_arg(n.kwargs, get)) if n.kwargs else {}
                    if op == "call_module":
                        value = mods[n.target](*a, **k)
                    elif op == "call_function":
                        value = (fns.get(n.target, n.target) if fns else n.target)(*a, **k)
                    elif op == "call_method":
                        value = getattr(a[0], n.target)(*a[1:], **k)
                    else:  # get_attr
                        value = self.fetch_attr(n.target)
            except Exception as e:
                msg = f"While executing {n.format_node()}"
                e.args = (f"{e.args[0]}\n\n{msg}" if e.args else msg,) + e.args[1:]
                if isinstance(e, KeyError):
                    raise RuntimeError(*e.args) from e
                raise
            n.meta["shape"], n.meta["dtype"] = _describe(value)
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
