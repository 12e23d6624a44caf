"""Tensor attributes met while tracing, found by identity in one lookup.

fx's Tracer finds the qualified name of a parameter or buffer the traced code reads (or passes
as an argument) by walking ``root.named_parameters()`` / ``named_buffers()`` until it meets the
tensor: once per read, so tracing costs O(reads x tensors). On a 52-BatchNorm MobileNetV2 that
walk was half of capture's time. :class:`IndexedAttributes` answers the same question from a
dictionary built once per trace, with the names fx would give (the first name of a shared
tensor), and falls back to fx for a tensor the index does not know (one made during forward).
:func:`attributes_restored` undoes what a traced forward stores on its modules.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.fx.proxy import ParameterProxy

from .copying import tree_modules

_Index = dict[int, tuple[torch.Tensor, str]]


class IndexedAttributes:
    """Mixin for an ``fx.Tracer`` subclass: ``getattr`` and ``create_arg`` name a root's
    parameters and buffers from an index instead of a search."""

    def trace(self, root: Any, concrete_args: Any = None) -> fx.Graph:
        self._attribute_index = None  # built for this root on first use
        return super().trace(root, concrete_args)

    def _attribute_name(self, a: torch.Tensor, buffers_too: bool) -> str | None:
        index = self.__dict__.get("_attribute_index")
        if index is None:  # id -> (tensor, name): the tensor is kept, so its id is not reused
            params: _Index = {}
            buffers: _Index = {}
            for name, p in self.root.named_parameters():
                params.setdefault(id(p), (p, name))
            for name, b in self.root.named_buffers():
                buffers.setdefault(id(b), (b, name))
            index = self._attribute_index = (params, buffers)
        params, buffers = index
        for table in (params, buffers) if buffers_too else (params,):
            found = table.get(id(a))
            if found is not None and found[0] is a:
                return found[1]
        return None

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        name = self._attribute_name(attr_val, False) if isinstance(attr_val, nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = self._attribute_name(attr_val, True)
        if name is None:  # not the root's own tensor: fx's search decides, as it always did
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            factory = None if not self.param_shapes_constant else (
                lambda node: ParameterProxy(self, node, name, attr_val))
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {}, proxy_factory_fn=factory)
        return parameter_proxy_cache[name]

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor) and not isinstance(a, fx.Proxy):
            name = self._attribute_name(a, not isinstance(a, nn.Parameter))
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)


@contextmanager
def attributes_restored(root: nn.Module) -> Iterator[None]:
    """A forward may store what it computes on its module (HF Swin's ``self.shift_size``): traced,
    that is a Proxy, which the module tree kept beside the graph (``Shrink(into="modules")``) must
    not hold. After the block, such attributes get their value from before it back (or go, if new)."""
    mods = tree_modules(root)
    before = {id(m): dict(vars(m)) for m in mods}
    try:
        yield
    finally:
        for m in mods:  # a module added during the block holds nothing traced before it
            old = before.get(id(m), {})
            for k, v in list(vars(m).items()):
                if isinstance(v, fx.Proxy):
                    if k in old:
                        m.__dict__[k] = old[k]
                    else:
                        del m.__dict__[k]
