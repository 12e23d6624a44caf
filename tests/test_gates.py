"""One channel scaling many, and positions that carry channels. FocalNet's gates (each one
channel of the projection, broadcast over the context's channels) and a spatial attention map (one
channel over the whole feature map): each product is zero where its own channel is, so the many
channels stay separate units; the one channel stays while anything reads it. CoaT's aggregate, a
pointwise Conv1d whose positions are the channels, passes them along. Also the padding modules
(``nn.ZeroPad2d``, ``nn.ReflectionPad2d``...), whose forward is ``F.pad``."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from passes import Shrink
from surgery.channels import channel_groups

from helpers import Scale, insert_shared_mask, masked_and_shrunk, n_params


class FocalModulation(nn.Module):
    """timm's FocalNet modulation, small: one projection split into queries, context and gates;
    each focal level's context is weighed by its own gate channel."""

    def __init__(self, c: int = 8, levels: int = 2):
        super().__init__()
        self.c, self.levels = c, levels
        self.f = nn.Conv2d(3, 2 * c + levels + 1, 1)
        self.focal = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False) for _ in range(levels)])
        self.h = nn.Conv2d(c, c, 1)
        self.proj = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        q, ctx, gates = torch.split(self.f(x), (self.c, self.c, self.levels + 1), 1)
        ctx_all = 0
        for level, layer in enumerate(self.focal):
            ctx = F.gelu(layer(ctx))
            ctx_all = ctx_all + ctx * gates[:, level:level + 1]
        ctx_all = ctx_all + F.gelu(ctx.mean((2, 3), keepdim=True)) * gates[:, self.levels:]
        return self.proj(q * self.h(ctx_all)).mean((2, 3))


def test_focal_gates_leave_the_context_channels_apart():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = FocalModulation().eval()
    gm = surgery.capture(model, (x,))
    (group,) = [g for g in channel_groups(gm) if g.size == 19]  # 8 queries, 8 context, 3 gates: one unit each
    f = torch.rand(19) + 0.5
    f[[1, 5, 9, 12, 16]] = 0  # queries 1 and 5, context 1 and 4, the first gate
    insert_shared_mask(gm, group, Scale(f, -3), "m")
    small = surgery.compress(gm, [Shrink()], (x,))
    # f 3x15+15 (the gate stays: its slice would be empty), focal 2x(6x9), h 6x6+6, proj 6x4+4
    assert n_params(model) == 76 + 144 + 72 + 36
    assert n_params(small) == 60 + 108 + 42 + 28
    assert any("would lose every channel" in why for row in surgery.shrink_report(small).groups
               for why in row.kept.values())
    x2 = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x2), gm(x2), rtol=1e-5, atol=1e-5)


class SpatialAttention(nn.Module):
    """A map of one channel (from the mean over the channels) scales every channel."""

    def __init__(self):
        super().__init__()
        self.stem, self.attn = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x * torch.sigmoid(self.attn(x.mean(1, keepdim=True)))
        return self.out(x).mean((2, 3))


def test_a_spatial_attention_map_leaves_the_channels_it_scales_prunable():
    masked, small, _ = masked_and_shrunk(SpatialAttention().eval(), (2, 3, 8, 8))
    # stem 3x9x4+4, attn 1x9+1 (whole), out 4x4+4
    assert n_params(small) == 112 + 10 + 20
    x2 = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x2), masked(x2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pad", [nn.ZeroPad2d((1, 0, 1, 0)), nn.ConstantPad2d(1, 0.5), nn.ReflectionPad2d(1),
                                 nn.ReplicationPad2d(1), nn.CircularPad2d(1)], ids=lambda m: type(m).__name__)
def test_padding_modules_pass_channels_through(pad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), pad, nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1)).eval()
    masked, small, _ = masked_and_shrunk(model, (2, 3, 12, 12))
    # conv 3x9x4+4, depthwise 4x9+4, pointwise 4x4+4
    assert n_params(model) == 224 + 80 + 36 and n_params(small) == 112 + 40 + 20
    x2 = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(small(x2), masked(x2), rtol=1e-5, atol=1e-5)


class Aggregate(nn.Module):
    """CoaT's head: three streams' class tokens stacked, (B, 3, C), mixed into one by a Conv1d of
    kernel 1 whose positions are the channels."""

    def __init__(self):
        super().__init__()
        self.streams = nn.ModuleList([nn.Linear(4, 8) for _ in range(3)])
        self.aggregate, self.head = nn.Conv1d(3, 1, 1), nn.Linear(8, 2)

    def forward(self, x):
        tokens = torch.stack([s(x) for s in self.streams], dim=1)
        return self.head(self.aggregate(tokens).squeeze(1))


def test_a_pointwise_conv_over_channels_as_positions_passes_them():
    masked, small, _ = masked_and_shrunk(Aggregate().eval(), (2, 4))
    # three streams 4x4+4 (channel c goes from all three at once), aggregate 3+1, head 4x2+2
    assert n_params(Aggregate()) == 3 * 40 + 4 + 18
    assert n_params(small) == 3 * 20 + 4 + 10
    x2 = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(small(x2), masked(x2), rtol=1e-5, atol=1e-6)
