"""What several test files share: a parameter count, BatchNorms that are no identity by accident,
a torchvision model built offline, and a model masked by ChannelPrune then shrunk.

Imported as ``from helpers import ...`` (pytest puts this folder on the path); it holds no tests.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

import surgery
from passes import ChannelPrune, Shrink


def n_params(m: nn.Module) -> int:
    """The number of parameters of `m`; a tensor held twice (tied) counts once, as ``parameters()`` lists it."""
    return sum(p.numel() for p in m.parameters())


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """`model` in eval mode, every BatchNorm given random statistics and affine terms, so that no
    BatchNorm is an identity by accident (fresh ones are, in eval mode)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def torchvision_model(name: str) -> nn.Module:
    """torchvision's `name` in eval mode, with random weights (and backbone): nothing is downloaded."""
    import torchvision.models as tvm
    kw = {"weights": None}
    if name.startswith(("deeplab", "fasterrcnn", "fcn", "lraspp")):
        kw["weights_backbone"] = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tvm.get_model(name, **kw).eval()


def masked_and_shrunk(model: nn.Module, shape: tuple[int, ...], **prune) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(`model` masked by ChannelPrune(ratio=0.5, **prune), that shrunk, the example input of `shape`
    both were made with)."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = surgery.compress(model, [ChannelPrune(**{"ratio": 0.5, **prune})], example_inputs=(x,))
    small = surgery.compress(masked, [Shrink()], example_inputs=(x,))
    return masked, small, x
