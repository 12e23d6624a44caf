"""Output shapes for the meta shape run (:func:`surgery.shapes.annotate_shapes`), computed in
Python where torch's meta kernels are slow Python decompositions.

The meta run executes a captured graph on tensors without data. Most of torch's meta kernels
are fast, but some are Python decompositions that cost more than the real op on a small input:
an element-wise add or an adaptive pooling ~0.15-0.2 ms, a convolution ~40 us, a mean over the
spatial axes ~0.5 ms, a GELU ~0.8 ms, an interpolation ~10 ms, an attention ~2 ms. In a
squeeze-excite network or a small vision transformer they cost more than the real layers. The
functions here give those ops' output shapes directly. Each handles only the plain case (the
input's channel count fits, the dtype is a float, no option it does not know) and otherwise
runs the op itself on the meta device, so bad input still fails the way it fails for real.
``tests/test_shapes.py`` checks every one against the real run.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .libraries import whole_layer

__all__ = ["SHAPE_KEEPING", "same", "meta_layer", "meta_shape_of", "META_FUNCTIONS", "META_METHODS"]


# modules whose output has their (single) input's shape and dtype, by exact class: a subclass may
# override forward. The meta shape run skips them (their meta kernels are slow Python decompositions).
SHAPE_KEEPING = frozenset({
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softmax, nn.LogSoftmax,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
})


def same(x: Any, *args: Any, **kwargs: Any) -> Any:
    return x


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


def meta_shape_of(m: nn.Module) -> Callable[[nn.Module, Any], torch.Tensor | None] | None:
    """How the meta run computes `m`'s output shape: by its exact class, or as a norm for the
    library norm-activation layers capture keeps whole (element-wise after the norm)."""
    return _META_SHAPES.get(type(m)) or (_norm_shape if whole_layer(m) else None)


def meta_layer(m: nn.Module) -> Callable[..., Any]:
    """`m` for the meta run: its output shape computed directly where that is plain."""
    shape_of = meta_shape_of(m)

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


def _is_meta_float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "meta" and x.is_floating_point()


def _meta_unary(op: Callable[..., Any]) -> Callable[..., Any]:
    """An element-wise `op` (an activation, exp, dropout) for the meta run: its input's shape
    and dtype, where no other argument is a tensor."""
    def run(x: Any, *args: Any, **kwargs: Any) -> Any:
        if _is_meta_float(x) and not any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
            return _meta_empty(x.shape, x.dtype)
        return op(x, *args, **kwargs)
    return run


def _meta_softmax(op: Callable[..., Any]) -> Callable[..., Any]:
    """softmax / log_softmax over one axis, without a dtype: the input's shape and dtype."""
    def run(x: Any, dim: Any = None, *args: Any, **kwargs: Any) -> Any:
        d = kwargs.get("dim", dim)
        if _is_meta_float(x) and isinstance(d, int) and -x.dim() <= d < max(x.dim(), 1) and not args and \
                set(kwargs) <= {"dim"}:
            return _meta_empty(x.shape, x.dtype)
        return op(x, dim, *args, **kwargs)
    return run


def _reduced(x: torch.Tensor, dim: Any, keepdim: Any) -> list[int] | None:
    """The shape of a reduction of `x` over `dim` (int, ints, or None: every axis)."""
    nd = x.dim()
    dims = list(range(nd)) if dim is None else [dim] if isinstance(dim, int) else list(dim) \
        if isinstance(dim, (tuple, list)) else None
    if not dims or not isinstance(keepdim, bool) or not all(type(d) is int and -nd <= d < nd for d in dims):
        return None
    axes = {d % nd for d in dims}
    if len(axes) != len(dims):
        return None
    if keepdim:
        return [1 if i in axes else s for i, s in enumerate(x.shape)]
    return [s for i, s in enumerate(x.shape) if i not in axes]


def _meta_mean(op: Callable[..., Any]) -> Callable[..., Any]:
    """mean(x, dim, keepdim) of a float tensor, without a dtype: the reduced shape."""
    def run(x: Any, *args: Any, **kwargs: Any) -> Any:
        if _is_meta_float(x) and len(args) <= 2 and set(kwargs) <= {"dim", "keepdim"}:
            named = dict(zip(("dim", "keepdim"), args), **kwargs)
            if len(named) == len(args) + len(kwargs) and (args or "dim" in kwargs):
                shape = _reduced(x, named.get("dim"), named.get("keepdim", False))
                if shape is not None:
                    return _meta_empty(shape, x.dtype)
        return op(x, *args, **kwargs)
    return run


def _interpolate_args(input: Any, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
                      align_corners: Any = None, recompute_scale_factor: Any = None,
                      antialias: bool = False) -> dict[str, Any]:
    return locals()


_MODE_DIMS = {"linear": (1,), "bilinear": (2,), "bicubic": (2,), "trilinear": (3,),
              "nearest": (1, 2, 3), "nearest-exact": (1, 2, 3), "area": (1, 2, 3)}


def _meta_interpolate(*args: Any, **kwargs: Any) -> Any:
    """F.interpolate to a size, or by a scale factor (floor(side * factor), as torch does)."""
    try:
        a = _interpolate_args(*args, **kwargs)
    except TypeError:
        a = None
    x = a and a["input"]
    if a and _is_meta_float(x) and x.dim() - 2 in _MODE_DIMS.get(a["mode"], ()) and not a["antialias"] and \
            (a["align_corners"] is None or a["mode"] in ("linear", "bilinear", "bicubic", "trilinear")):
        d, size, scale = x.dim() - 2, a["size"], a["scale_factor"]
        if size is not None and scale is None:
            sides = [size] * d if type(size) is int else list(size) if isinstance(size, (tuple, list)) else None
        elif scale is not None and size is None:
            factors = [scale] * d if isinstance(scale, (int, float)) else list(scale) \
                if isinstance(scale, (tuple, list)) else []
            sides = [math.floor(float(n) * f) for n, f in zip(x.shape[2:], factors)] if len(factors) == d and \
                all(isinstance(f, (int, float)) and f > 0 for f in factors) else None
        else:
            sides = None
        if sides and len(sides) == d and all(type(s) is int and s > 0 for s in sides):
            return _meta_empty((*x.shape[:2], *sides), x.dtype)
    return F.interpolate(*args, **kwargs)


def _meta_attention(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
    """scaled_dot_product_attention without a mask: (..., L, Ev) from q (..., L, E), k (..., S,
    E) and v (..., S, Ev) of one dtype and the same leading axes."""
    mask = args[0] if args else kwargs.get("attn_mask")
    if (all(_is_meta_float(t) for t in (q, k, v)) and mask is None and not kwargs.get("enable_gqa", False)
            and len(args) <= 4 and q.dim() >= 2 and q.dim() == k.dim() == v.dim()
            and q.dtype == k.dtype == v.dtype and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
            and q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2]):
        return _meta_empty((*q.shape[:-1], v.shape[-1]), q.dtype)
    return F.scaled_dot_product_attention(q, k, v, *args, **kwargs)


def _method(name: str) -> Callable[..., Any]:
    return lambda x, *args, **kwargs: getattr(x, name)(*args, **kwargs)


_UNARY_FUNCTIONS = (F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.elu,
                    F.leaky_relu, F.softplus, F.sigmoid, F.tanh, F.dropout, torch.relu, torch.sigmoid, torch.tanh,
                    torch.exp, torch.sqrt, torch.rsqrt, torch.abs, torch.neg, torch.erf)
_UNARY_METHODS = ("relu", "sigmoid", "tanh", "exp", "sqrt", "rsqrt", "abs", "neg", "erf")

#: call_function targets of the meta run, by the function they replace
META_FUNCTIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    **{f: _meta_binary(f) for f in (operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul)},
    **{f: _meta_unary(f) for f in _UNARY_FUNCTIONS},
    F.softmax: _meta_softmax(F.softmax), F.log_softmax: _meta_softmax(F.log_softmax),
    torch.mean: _meta_mean(torch.mean),
    F.batch_norm: _meta_batch_norm, F.layer_norm: _meta_layer_norm, F.interpolate: _meta_interpolate,
    F.scaled_dot_product_attention: _meta_attention}

#: call_method targets of the meta run, by method name
META_METHODS: dict[str, Callable[..., Any]] = {
    **{n: _meta_unary(_method(n)) for n in _UNARY_METHODS},
    "softmax": _meta_softmax(_method("softmax")), "log_softmax": _meta_softmax(_method("log_softmax")),
    "mean": _meta_mean(_method("mean"))}
