"""What several test files share: a parameter count, BatchNorms that are no identity by accident,
a torchvision model built offline, a model masked by ChannelPrune then shrunk, and a mask of
arbitrary factors placed by hand on a channel group's mask points.

Imported as ``from helpers import ...`` (pytest puts this folder on the path); it holds no tests.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch import Tensor, nn

import surgery
from passes import ChannelPrune, Shrink
from passes._placement import call_after
from surgery.channels import ChannelGroup
from surgery.pipeline import UnitMask


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
    return (*pruned_at(model, x, **prune), x)


def pruned_at(model: nn.Module, x, **prune) -> tuple[nn.Module, nn.Module]:
    """(`model` masked by ChannelPrune(ratio=0.5, **prune) on the example input `x`, that shrunk)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = surgery.compress(model, [ChannelPrune(**{"ratio": 0.5, **prune})], example_inputs=(x,))
        small = surgery.compress(masked, [Shrink()], example_inputs=(x,))
    return masked, small


class Scale(UnitMask):
    """A mask with arbitrary per-unit factors (zeros removed, the rest folded or kept)."""

    def __init__(self, f: Tensor, dim: int):
        super().__init__(len(f), dim)
        self.register_buffer("f", f)

    def factors(self) -> Tensor:
        return self.f


def insert_shared_mask(gm: fx.GraphModule, group: ChannelGroup, mask: UnitMask, name: str) -> None:
    """`mask` installed as `name` and called after every mask point of `group` (one module shared by
    all of them, as the mask passes place theirs); `gm` recompiled."""
    gm.add_submodule(name, mask)
    for point in group.mask_points():
        call_after(point, name, mask)
    gm.recompile()
