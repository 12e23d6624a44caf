"""Other libraries' tracing registries, honoured by capture without being named.

timm marks the modules and functions that torch.fx cannot trace with
``timm.layers.register_notrace_module`` / ``register_notrace_function`` (they stay single
nodes, as in timm's own feature extraction). Capture reads those registries whenever timm has
been imported; it never imports timm itself.
"""
from __future__ import annotations

import sys
from typing import Callable

__all__ = ["library_leaves"]


def library_leaves() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """(module classes, functions) that loaded libraries register as not traceable."""
    registry = sys.modules.get("timm.layers._fx")
    if registry is None:
        return (), ()
    types = tuple(m for m in getattr(registry, "_leaf_modules", ()) if isinstance(m, type))
    functions = tuple(f for f in getattr(registry, "_autowrap_functions", ()) if callable(f) and not isinstance(f, type))
    return types, functions
