"""Other libraries' tracing registries, honoured by capture without being named.

timm marks the functions that torch.fx cannot trace with ``register_notrace_function``:
capture keeps each call a single node, whenever timm has been imported (it never imports timm
itself). timm's ``register_notrace_module`` list is not followed: it names whole blocks
(NormFreeBlock, MobileVitBlock) kept whole for its feature extraction, most of which surgery's
shape-concrete tracing traces, and whose layers would otherwise stay out of every channel
group; a block that does fail to trace is kept opaque by capture, its children still traced.

Besides those, a few library layers are kept whole because the channel analysis has a rule for
the layer (:mod:`surgery.channels.rules.libraries`) and none for what its forward does inside:
timm's StdConv2d and ScaledStdConv2d (and their ``Same`` forms) standardise their weight per
filter, which traced ops would only show as a weight computed on the way; Hugging Face's Conv1D (GPT-2's linear layer,
its weight transposed) would trace to an ``addmm`` that no module selection can name.

timm's BatchNormAct2d (a BatchNorm2d that also runs its ``drop`` and ``act``) is kept whole when
both are element-wise torch.nn layers without parameters (:func:`whole_layer`): its rule covers
the three, and one node stands where its traced forward left eleven (a rank assert, four table
reads, ``F.batch_norm``, two calls), which every later step pays for. Half the norm layers of
timm's CNNs are these. With any other ``act`` (a PReLU per channel, timm's own activations) it is
traced into, and ``F.batch_norm`` and the act's own rules see it.
"""
from __future__ import annotations

import sys
from typing import Callable

from torch import nn

from .layers import ELEMENTWISE, PASSING

__all__ = ["library_leaves", "whole_layer", "standardised_conv", "STANDARDISED_CONVS"]

STANDARDISED_CONVS = ("StdConv2d", "ScaledStdConv2d", "StdConv2dSame", "ScaledStdConv2dSame")
_WHOLE_LAYERS = {"timm.layers": STANDARDISED_CONVS, "transformers.pytorch_utils": ("Conv1D",)}


def _whole_layers() -> tuple[type, ...]:
    found = []
    for module, names in _WHOLE_LAYERS.items():
        loaded = sys.modules.get(module)
        found += [getattr(loaded, k) for k in names
                  if loaded is not None and isinstance(getattr(loaded, k, None), type)]
    return tuple(found)


_NORM_ACT = {"timm.layers.norm_act": ("BatchNormAct2d", "SyncBatchNormAct")}


def whole_layer(m: nn.Module) -> bool:
    """A library norm-activation layer that capture keeps whole although its class defines a
    forward of its own (see the module docstring): its ``drop`` and ``act`` are element-wise
    torch.nn layers of exactly those classes, so the layer is channel-local on axis 1 and its rule
    (BatchNorm's tables, then drop and act on a constant channel) describes all of it."""
    cls = type(m)
    if cls.__name__ not in _NORM_ACT.get(cls.__module__, ()):
        return False
    drop, act = m._modules.get("drop"), m._modules.get("act")
    return type(drop) in PASSING and type(act) in (*ELEMENTWISE, *PASSING) and set(m._modules) == {"drop", "act"}


def standardised_conv(m: nn.Module) -> bool:
    """timm's convolutions that standardise each filter before convolving: scaling their weight
    scales nothing (a ScaledStdConv2d's ``gain`` does)."""
    return type(m).__name__ in STANDARDISED_CONVS and type(m).__module__.startswith("timm.layers")


def library_leaves() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """(the library layers kept whole for their channel rules, the functions that loaded
    libraries register as not traceable)."""
    registry = sys.modules.get("timm.layers._fx")
    if registry is None:
        return _whole_layers(), ()
    functions = tuple(f for f in getattr(registry, "_autowrap_functions", ())
                      if callable(f) and not isinstance(f, type))
    return _whole_layers(), functions
