"""Convolutions that standardise each filter over its inputs (timm's StdConv2d and ScaledStdConv2d,
of BiT and the NFNets) lose input channels exactly: Shrink writes them as ops that keep the
removed weights' statistics (surgery.norms.emit_standardised_conv).

The reference is built by hand: the original layers, the removed channels zeroed by a hook, so
each filter is standardised over all its original weights by timm's own forward."""
import warnings

import pytest
import torch
import torch.fx as fx
from torch import nn

import surgery
from passes import DAM, ChannelPrune, Shrink
from surgery.errors import SurgeryError
from surgery.norms import REMOVED_STATS

from helpers import masked_and_shrunk, n_params

timm = pytest.importorskip("timm")
L = timm.layers


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(L.StdConv2d(3, 16, 3), nn.ReLU(), L.ScaledStdConv2d(16, 16, 3), nn.ReLU(),
                         nn.Conv2d(16, 4, 1)).eval()


def _kept(masked: fx.GraphModule) -> list[torch.Tensor]:
    """The kept units of each mask, in the order of the layers they follow."""
    masks = surgery.masks(masked)
    order = [n.target for n in masked.graph.nodes if n.op == "call_module" and n.target in masks]
    return [masks[t].kept() for t in order]


def _zeroed(net: nn.Module, keep: dict[str, torch.Tensor]):
    """`net` with the channels not in ``keep[name]`` zeroed after each named layer (a hook)."""
    hooks = [net.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, k=k: out * k.to(out.dtype).reshape(1, -1, 1, 1)) for name, k in keep.items()]
    return hooks


def test_standardised_conv_loses_input_channels_against_timm_forward():
    net = _net()
    masked, small, x = masked_and_shrunk(net, (2, 3, 12, 12))
    k1, k2 = _kept(masked)
    assert int(k1.sum()) == 8 and int(k2.sum()) == 8
    conv = small.get_submodule("2")
    assert (conv.in_channels, conv.out_channels) == (8, 8)
    # 3*8*9 (no bias) | 8*8*9 + 8 (bias) + 8 (gain) | 4*8 + 4; the removed weights' statistics: 2 buffers of 8
    assert n_params(small) == 216 + 592 + 36
    assert [tuple(b.shape) for n, b in small.named_buffers() if n.rpartition(".")[2] in REMOVED_STATS] == [(8, 1)] * 2
    hooks = _zeroed(net, {"1": k1, "3": k2})
    x2 = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        want = net(x2)
    for h in hooks:
        h.remove()
    assert torch.allclose(small(x2), want, atol=1e-5, rtol=1e-5)
    # the statistics matter: with the removed weights' mean and spread those of the kept ones,
    # as a ScaledStdConv2d of 8 inputs would standardise, the output moves
    conv = small.get_submodule("2")
    w = conv.weight.detach().flatten(1)
    conv.standardised_removed_mean = w.mean(1, keepdim=True)
    conv.standardised_removed_m2 = (w - w.mean(1, keepdim=True)).square().sum(1, keepdim=True)
    assert not torch.allclose(small(x2), want, atol=1e-3, rtol=1e-3)


def test_training_the_shrunk_layer_moves_as_the_masked_one():
    """The removed weights' statistics are buffers: the kept weights' gradients in the shrunk
    model are those of the same weights in the masked model."""
    masked, small, x = masked_and_shrunk(_net(), (2, 3, 12, 12))
    k1, k2 = _kept(masked)
    masked(x).square().sum().backward()
    small(x).square().sum().backward()
    g_full = masked.get_submodule("2").weight.grad[k2][:, k1]
    g_small = small.get_submodule("2").weight.grad
    assert torch.allclose(g_small, g_full, atol=1e-5, rtol=1e-4)
    assert torch.allclose(small.get_submodule("2").gain.grad, masked.get_submodule("2").gain.grad[k2],
                          atol=1e-5, rtol=1e-4)


def _grouped() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(L.StdConv2d(3, 16, 3), nn.ReLU(), L.ScaledStdConv2d(16, 32, 3, groups=4), nn.GELU(),
                         L.ScaledStdConv2dSame(32, 32, 3, groups=32), nn.ReLU(),
                         L.StdConv2dSame(32, 16, 3, stride=2, groups=2), nn.ReLU(), L.ScaledStdConv2d(16, 12, 1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4)).eval()


def test_grouped_depthwise_and_same_padded_standardised_convs():
    masked, small, _ = masked_and_shrunk(_grouped(), (2, 3, 15, 15))
    shapes = [(n, m.in_channels, m.out_channels, m.groups) for n, m in small.named_modules()
              if isinstance(m, nn.Conv2d)]
    assert shapes == [("0", 3, 8, 1), ("2", 8, 16, 4), ("4", 16, 16, 16), ("6", 16, 8, 2), ("8", 8, 6, 1)]
    x2 = torch.randn(3, 3, 17, 17)  # another size: the Same padding is computed at run time
    with torch.no_grad():
        assert torch.allclose(small(x2), masked(x2), atol=1e-5, rtol=1e-5)
    # the depthwise layer lost whole filters: its statistics are its own, so no buffers there
    assert not any(n.startswith("4.") for n, _ in small.named_buffers())


def test_mask_factors_are_never_folded_into_a_standardised_weight():
    """DAM's kept factors are not 1: a standardised filter would undo them in its weight (a
    StdConv2d keeps them as a scale; a ScaledStdConv2d takes them into its gain)."""
    for net, x in ((_net(), torch.randn(2, 3, 12, 12)), (_grouped(), torch.randn(2, 3, 15, 15))):
        gm = surgery.compress(net, [DAM()], example_inputs=(x,))
        for m in surgery.masks(gm).values():
            with torch.no_grad():
                m.beta.fill_(-0.3)  # some units closed, the others at factors below 1
        small = surgery.compress(gm, [Shrink()], example_inputs=(x,))
        x2 = torch.randn_like(x)
        with torch.no_grad():
            assert torch.allclose(small(x2), gm(x2), atol=1e-5, rtol=1e-5)
        assert n_params(small) < n_params(net)


def test_modules_form_refuses_and_normalised_false_keeps_the_inputs():
    net, x = _net(), torch.randn(2, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SurgeryError, match=r"ScaledStdConv2d '2' lost input channels: it standardises each filter "
                                               r"over all its original weights.*normalised=False"):
            surgery.compress(net, [ChannelPrune(0.5), Shrink(into="modules")], example_inputs=(x,))
        masked = surgery.compress(net, [ChannelPrune(0.5, normalised=False)], example_inputs=(x,))
    reasons = {g.frozen for g in surgery.channel_groups(masked)}
    assert "ScaledStdConv2d '2' standardises each filter over all its input channels" in reasons
    small = surgery.compress(masked, [Shrink(into="modules")], example_inputs=(x,))
    assert isinstance(small.get_submodule("2"), L.ScaledStdConv2d)
    assert small.get_submodule("2").in_channels == 16 and small.get_submodule("2").out_channels == 8
    with torch.no_grad():
        assert torch.allclose(small(x), masked(x), atol=1e-5)
