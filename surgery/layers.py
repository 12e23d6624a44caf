"""torch.nn layers in a captured graph: which subclasses capture keeps whole, and which traced
layers keep their class.

- A subclass of a torch.nn layer that changes nothing its forward runs (torchvision's
  Conv3DSimple) is a leaf, as its base class is: :func:`torch_layer_subclass`.
- A layer whose forward is traced into (timm's BatchNormAct2d calls ``F.batch_norm`` on its own
  buffers, Conv2dSame calls ``F.conv2d`` on its own weight) leaves ``get_attr`` nodes in the
  graph. torch.fx then holds those tensors under bare ``nn.Module`` containers, and the layer's
  class and its settings (groups, padding, eps, num_features) are lost to anything that reads
  the graph. :func:`restore_layers` puts the layer itself back at that path: the channel rules
  for functional layers find the module whose tensors they cut, and Shrink updates its counts.
- ``nn.MultiheadAttention`` keeps its heads inside one call, where no rule can reach them, and
  its class ties the head width to the stream's. Capture traces a self-attention call of it as
  the same computation in plain ops (:func:`attention_ops`): its in-projection, the heads,
  ``scaled_dot_product_attention``, its out-projection. Heads and stream are then pruned like
  any other attention's. ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` are traced
  through the same way (:func:`traced_as_ops`).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["torch_layer_subclass", "restore_layers", "traced_as_ops", "attention_ops", "AS_OPS"]

# methods a subclass may define and still compute exactly what its torch.nn base computes
_SETUP_METHODS = frozenset({"__init__", "extra_repr", "reset_parameters", "__repr__", "__setstate__"})


@functools.lru_cache(maxsize=None)
def torch_layer_subclass(cls: type) -> bool:
    """A subclass of a torch.nn layer that changes nothing its forward runs (torchvision's
    Conv3DSimple: an nn.Conv3d with a helper static method): a leaf, as its base class is, so
    the channel rules for the base apply to it."""
    if cls.__module__.startswith("torch.nn") or cls is nn.Module:
        return False
    for base in cls.__mro__[1:]:
        if base.__module__.startswith("torch.nn.modules") and base is not nn.Module:
            break
    else:
        return False
    if base in (nn.Sequential, nn.ModuleList, nn.ModuleDict):  # a container: traced through, as fx does
        return False
    for klass in cls.__mro__[:cls.__mro__.index(base)]:
        for k, v in vars(klass).items():
            if k not in _SETUP_METHODS and (inspect.isfunction(v) or isinstance(v, property)):
                return False
    return True


# torch.nn layers that hide other layers inside one call: traced as ops (:func:`traced_as_ops`)
AS_OPS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)

# layers whose functional form the channel rules follow, given the module that holds the tensors
_LAYERS = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.Linear, nn.Embedding, nn.EmbeddingBag,
           nn.LayerNorm, nn.GroupNorm, nn.MultiheadAttention)


def restore_layers(gm: fx.GraphModule, root: nn.Module) -> int:
    """Where a ``get_attr`` of `gm` reads a tensor of a torch.nn layer in `root` (the module that was
    traced) and `gm` holds it under a bare container, put that layer there instead: the same
    object, so the same tensors. Only when every child of the layer is already at its place in
    `gm` or holds no tensors (nothing the graph does not use comes in). Returns how many."""
    done = 0
    prefixes = dict.fromkeys(str(n.target).rpartition(".")[0] for n in gm.graph.find_nodes(op="get_attr"))
    for prefix in sorted(prefixes, key=lambda q: -q.count(".")):  # a layer's children first (MHA's out_proj)
        if not prefix:
            continue
        try:
            have, real = gm.get_submodule(prefix), root.get_submodule(prefix)
        except AttributeError:
            continue
        if type(have) is not nn.Module or not isinstance(real, _LAYERS):
            continue
        if any(getattr(have, k, None) is not child and next(child.parameters(), None) is not None
               for k, child in real.named_children()):
            continue
        if any(getattr(real, k, None) is not t for k, t in (*have._parameters.items(), *have._buffers.items())):
            continue  # not the same tensors (a graph made from another copy)
        parent, _, name = prefix.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, real)
        done += 1
    return done


def traced_as_ops(m: nn.Module, args: tuple, kwargs: dict) -> Callable[..., Any] | None:
    """A forward that traces the call ``m(*args, **kwargs)`` as plain ops and calls of `m`'s own
    layers, for the torch.nn layers that hide other layers inside one call, or None to keep the
    call whole. ``nn.MultiheadAttention``: :func:`attention_ops`. ``nn.TransformerEncoderLayer``
    and ``nn.TransformerEncoder`` (with no masks): their own slow path (the fused fast path
    is a kernel no rule sees into), each layer, norm and MultiheadAttention called as a module."""
    if type(m) is nn.MultiheadAttention:
        return attention_ops(m, args, kwargs)
    bound = dict(zip(("src", "mask" if type(m) is nn.TransformerEncoder else "src_mask", "src_key_padding_mask"),
                     args), **kwargs)
    if any(bound.get(k) is not None for k in ("mask", "src_mask", "src_key_padding_mask")) or bound.get("is_causal"):
        return None
    if type(m) is nn.TransformerEncoderLayer:
        def layer(src, *_, **__):
            sa = lambda x: m.dropout1(m.self_attn(x, x, x, need_weights=False)[0])  # noqa: E731
            ff = lambda x: m.dropout2(m.linear2(m.dropout(m.activation(m.linear1(x)))))  # noqa: E731
            if m.norm_first:
                x = src + sa(m.norm1(src))
                return x + ff(m.norm2(x))
            x = m.norm1(src + sa(src))
            return m.norm2(x + ff(x))
        return layer
    if type(m) is nn.TransformerEncoder:
        def encoder(src, *_, **__):
            for mod in m.layers:
                src = mod(src)
            return m.norm(src) if m.norm is not None else src
        return encoder
    return None


def attention_ops(m: nn.Module, args: tuple, kwargs: dict) -> Callable[..., Any] | None:
    """A forward for tracing the call ``m(*args, **kwargs)`` of an ``nn.MultiheadAttention`` as
    plain ops, or None to keep the call whole (the cases it does not cover: cross-attention,
    masks, separate k/v widths, bias_kv, zero attention, attention weights asked for).

    It computes what ``F.multi_head_attention_forward`` computes for self-attention: one packed
    in-projection, ``(B, T, 3, H, d)`` heads, ``scaled_dot_product_attention`` (with the layer's
    dropout in training) and the out-projection, with the sequence axis first unless the layer
    is ``batch_first``."""
    if type(m) is not nn.MultiheadAttention or not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        return None
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    bound = dict(zip(names, args), **kwargs)
    if not (bound.get("query") is bound.get("key") is bound.get("value")) or bound.get("need_weights", True) \
            or bound.get("key_padding_mask") is not None or bound.get("attn_mask") is not None \
            or bound.get("is_causal", False):
        return None

    def forward(query, key=None, value=None, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        x = query if m.batch_first else query.transpose(0, 1)
        b, t = x.shape[0], x.shape[1]
        qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias)
        q, k, v = qkv.view(b, t, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=m.dropout if m.training else 0.0)
        y = F.linear(y.transpose(1, 2).reshape(b, t, -1), m.out_proj.weight, m.out_proj.bias)
        return (y if m.batch_first else y.transpose(0, 1)), None
    return forward
