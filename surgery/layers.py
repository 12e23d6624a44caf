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
"""
from __future__ import annotations

import functools
import inspect

import torch.fx as fx
from torch import nn

__all__ = ["torch_layer_subclass", "restore_layers"]

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


# layers whose functional form the channel rules follow, given the module that holds the tensors
_LAYERS = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.Linear, nn.Embedding, nn.EmbeddingBag,
           nn.LayerNorm, nn.GroupNorm)


def restore_layers(gm: fx.GraphModule, root: nn.Module) -> int:
    """Where a ``get_attr`` of `gm` reads a tensor of a torch.nn layer in `root` (the module that was
    traced) and `gm` holds it under a bare container, put that layer there instead: the same
    object, so the same tensors. Only when every child of the layer is already at its place in
    `gm` or holds no tensors (nothing the graph does not use comes in). Returns how many."""
    done = 0
    for prefix in dict.fromkeys(str(n.target).rpartition(".")[0] for n in gm.graph.find_nodes(op="get_attr")):
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
