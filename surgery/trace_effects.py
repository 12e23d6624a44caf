"""What a trace changes outside its graph, and puts back when it ends.

While a tracer runs a model's forward (see :mod:`surgery.concrete`): torch's tensor factories
called with traced arguments (``torch.zeros(n, 4)`` with ``n`` read from a shape) become graph
nodes; torch's checks of a traced condition (``torch._check``, as Hugging Face's
``torch_compilable_check`` calls it) become asserts in the graph; and what the forward stores on
its modules as a proxy (a cache: timm ConViT's ``self.rel_indices = self.get_rel_indices(N)``)
is put back, since outside its trace a proxy means nothing and a later trace reading it would
add nodes to a finished graph.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate

__all__ = ["FACTORIES", "traced_torch", "modules_kept", "proxies_in"]

FACTORIES = ("ones", "zeros", "empty", "full", "rand", "randn", "arange", "eye", "tensor", "as_tensor", "ones_like")


def proxies_in(args: Any, kwargs: Any = None) -> list[fx.Proxy]:
    """The proxies among a call's arguments, nested ones included, in order."""
    found: list[fx.Proxy] = []
    map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, fx.Proxy) else None)
    return found


@contextlib.contextmanager
def traced_torch(tracer: fx.Tracer) -> Iterator[None]:
    """While `tracer` traces: torch's tensor factories called with traced arguments (a size read
    at run time) are graph nodes, and torch's checks of a traced condition are asserts in it."""
    originals = {name: getattr(torch, name) for name in FACTORIES}

    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            found = proxies_in(args, kwargs)
            if found and found[0].tracer is tracer:
                return tracer.create_proxy("call_function", fn, args, kwargs)
            return fn(*args, **kwargs)
        return recorded

    def check(fn: Any, at: int) -> Any:
        # torch._check(cond) / torch._check_with(error_type, cond, msg) on a traced condition
        # (Hugging Face's torch_compilable_check: Deformable DETR's spatial shapes against the
        # sequence): asserted in the graph, as eager code asserts it; a Python bool checks now
        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            cond = args[at] if len(args) > at else kwargs.get("cond")
            if isinstance(cond, fx.Proxy) and cond.tracer is tracer:
                tracer.create_proxy("call_function", torch._assert, (cond, f"{fn.__name__} failed"), {})
                return None
            return fn(*args, **kwargs)
        return checked

    checks = {"_check": (torch._check, 0), "_check_with": (torch._check_with, 1)}
    try:
        for name, fn in originals.items():
            setattr(torch, name, wrap(fn))
        for name, (fn, at) in checks.items():
            setattr(torch, name, check(fn, at))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)
        for name, (fn, _) in checks.items():
            setattr(torch, name, fn)


@contextlib.contextmanager
def modules_kept(root: Any) -> Iterator[None]:
    """Put back, when the block ends, what it stored as a proxy on `root`'s modules: attributes,
    buffers, and entries of a module's own dict attributes (timm TinyViT's
    ``attention_bias_cache[device]``); `root` may be a plain function, which has none."""
    state = [(m, dict(m.__dict__), dict(m._buffers),
              {k: dict(v) for k, v in m.__dict__.items() if type(v) is dict and k[0] != "_"})
             for m in root.modules()] if isinstance(root, nn.Module) else []
    try:
        yield
    finally:
        for m, attrs, buffers, dicts in state:
            for k, v in list(m.__dict__.items()):
                if isinstance(v, fx.Proxy):
                    if k in attrs:
                        m.__dict__[k] = attrs[k]
                    else:
                        del m.__dict__[k]
                elif type(v) is dict and k[0] != "_" and any(isinstance(e, fx.Proxy) for e in v.values()):
                    v.clear()
                    v.update(dicts.get(k, {}))
            for k, v in list(m._buffers.items()):
                if isinstance(v, fx.Proxy):
                    m._buffers[k] = buffers.get(k)
