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

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["ELEMENTWISE", "PASSING", "torch_layer_subclass", "restore_layers", "traced_as_ops",
           "traced_as_ops_candidate", "attention_ops", "window_attention_ops", "window_attention_3d_ops"]

# torch.nn layers that act on each element alone, with no parameters: activations (ELEMENTWISE) and
# layers that pass their input on unchanged in eval mode (PASSING)
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
               nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign, nn.Tanhshrink,
               nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink)
PASSING = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)

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
_AS_OPS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)


def traced_as_ops_candidate(m: nn.Module) -> bool:
    """Whether capture may trace a call of `m` as plain ops (:func:`traced_as_ops` decides per call)."""
    return isinstance(m, _AS_OPS) or _is_tv_window_attention(m)


def _is_tv_window_attention(m: nn.Module) -> bool:
    # torchvision's Swin (v1) and Swin3D attention; V2's cosine attention keeps its one call
    return (type(m).__name__, type(m).__module__) in {
        ("ShiftedWindowAttention", "torchvision.models.swin_transformer"),
        ("ShiftedWindowAttention3d", "torchvision.models.video.swin_transformer")}

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


def traced_as_ops(m: nn.Module, args: tuple, kwargs: dict, sizes_known: bool = True) -> Callable[..., Any] | None:
    """A forward that traces the call ``m(*args, **kwargs)`` as plain ops and calls of `m`'s own
    layers, for the torch.nn layers that hide other layers inside one call, or None to keep the
    call whole. ``nn.MultiheadAttention``: :func:`attention_ops`. ``nn.TransformerEncoderLayer``
    and ``nn.TransformerEncoder`` (with no masks): their own slow path (the fused fast path
    is a kernel no rule sees into), each layer, norm and MultiheadAttention called as a module.
    torchvision Swin's ``ShiftedWindowAttention`` (:func:`window_attention_ops`) only where the
    input sizes are known (`sizes_known`: capture has example inputs), as its padding and shift
    depend on them; without, its one call stays."""
    if type(m) is nn.MultiheadAttention:
        return attention_ops(m, args, kwargs)
    if _is_tv_window_attention(m):
        if not sizes_known:
            return None
        return window_attention_3d_ops(m) if type(m).__name__.endswith("3d") else window_attention_ops(m)
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


def window_attention_ops(m: nn.Module) -> Callable[..., Any]:
    """torchvision Swin's ``ShiftedWindowAttention`` forward as plain ops: what its wrapped
    ``shifted_window_attention`` computes, but with the head size the layer was built with where
    that function derives it from the input's width, so that the stream and the heads can shrink
    apart; the shift mask from ``arange`` comparisons where it fills a tensor slice by slice."""
    heads, ws = m.num_heads, list(m.window_size)
    hd = m.qkv.out_features // (3 * heads)
    n = ws[0] * ws[1]

    def forward(x):
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, (ws[1] - W % ws[1]) % ws[1], 0, (ws[0] - H % ws[0]) % ws[0]))
        _, ph, pw, _ = x.shape
        shift = [0 if ws[0] >= ph else m.shift_size[0], 0 if ws[1] >= pw else m.shift_size[1]]
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        nw = (ph // ws[0]) * (pw // ws[1])
        x = x.view(B, ph // ws[0], ws[0], pw // ws[1], ws[1], C).permute(0, 1, 3, 2, 4, 5).reshape(B * nw, n, C)
        q, k, v = m.qkv(x).reshape(x.size(0), n, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * hd ** -0.5).matmul(k.transpose(-2, -1))
        bias = m.relative_position_bias_table[m.relative_position_index].view(n, n, -1).permute(2, 0, 1)
        attn = attn + bias.contiguous().unsqueeze(0)
        if sum(shift) > 0:
            rows = (torch.arange(ph, device=x.device) >= ph - ws[0]).long() + \
                (torch.arange(ph, device=x.device) >= ph - shift[0]).long()
            cols = (torch.arange(pw, device=x.device) >= pw - ws[1]).long() + \
                (torch.arange(pw, device=x.device) >= pw - shift[1]).long()
            region = (rows[:, None] * 3 + cols[None, :]).to(x.dtype)  # torchvision's slice-by-slice count
            region = region.view(ph // ws[0], ws[0], pw // ws[1], ws[1]).permute(0, 2, 1, 3).reshape(nw, n)
            mask = region.unsqueeze(1) - region.unsqueeze(2)
            mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
            attn = (attn.view(x.size(0) // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, n, n)
        attn = F.dropout(F.softmax(attn, dim=-1), p=m.attention_dropout, training=m.training)
        x = m.proj(attn.matmul(v).transpose(1, 2).reshape(x.size(0), n, -1))
        x = F.dropout(x, p=m.dropout, training=m.training)
        x = x.view(B, ph // ws[0], pw // ws[1], ws[0], ws[1], -1).permute(0, 1, 3, 2, 4, 5).reshape(B, ph, pw, -1)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :H, :W, :].contiguous()
    return forward


def window_attention_3d_ops(m: nn.Module) -> Callable[..., Any]:
    """torchvision Swin3D's ``ShiftedWindowAttention3d`` forward as plain ops, as
    :func:`window_attention_ops` for 2-D windows; the padding and shift mask stay the calls of
    torchvision's own wrapped helpers."""
    from torchvision.models.video import swin_transformer as sw
    heads = m.num_heads
    hd = m.qkv.out_features // (3 * heads)

    def forward(x):
        b, t, h, w, c = x.shape
        ws, shift = list(m.window_size), list(m.shift_size)
        for i, size in enumerate((t, h, w)):
            if size <= ws[i]:  # the window shrinks to a small input, and does not shift
                ws[i], shift[i] = int(size), 0
        vol = ws[0] * ws[1] * ws[2]
        pad = sw._compute_pad_size_3d((t, h, w), (ws[0], ws[1], ws[2]))
        x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        _, tp, hp, wp, _ = x.shape
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1], -shift[2]), dims=(1, 2, 3))
        nw = (tp // ws[0]) * (hp // ws[1]) * (wp // ws[2])
        x = x.view(b, tp // ws[0], ws[0], hp // ws[1], ws[1], wp // ws[2], ws[2], c)
        x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b * nw, vol, c)
        q, k, v = m.qkv(x).reshape(x.size(0), vol, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * hd ** -0.5).matmul(k.transpose(-2, -1))
        index = m.relative_position_index[:vol, :vol].flatten()
        bias = m.relative_position_bias_table[index].view(vol, vol, -1).permute(2, 0, 1)
        attn = attn + bias.contiguous().unsqueeze(0)
        if sum(shift) > 0:
            mask = sw._compute_attention_mask_3d(x, (tp, hp, wp), (ws[0], ws[1], ws[2]), (shift[0], shift[1], shift[2]))
            attn = (attn.view(x.size(0) // nw, nw, heads, vol, vol) + mask.unsqueeze(1).unsqueeze(0))
            attn = attn.view(-1, heads, vol, vol)
        attn = F.dropout(F.softmax(attn, dim=-1), p=m.attention_dropout, training=m.training)
        x = m.proj(attn.matmul(v).transpose(1, 2).reshape(x.size(0), vol, -1))
        x = F.dropout(x, p=m.dropout, training=m.training)
        x = x.view(b, tp // ws[0], hp // ws[1], wp // ws[2], ws[0], ws[1], ws[2], -1)
        x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, tp, hp, wp, -1)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1], shift[2]), dims=(1, 2, 3))
        return x[:, :t, :h, :w, :].contiguous()
    return forward
