"""Windows: ``Tensor.unfold`` (HaloNet's neighbourhoods, along the spatial axes) passes the
channels through; ``F.unfold`` (im2col) lays each channel's kernel positions side by side, and a
layer reading the patches loses those columns with the channel. Each is masked, shrunk, and
compared with the masked model and with the parameter count the kept widths give."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from helpers import masked_and_shrunk, n_params


class Neighbourhoods(nn.Module):
    """Each position attends to its 3x3 neighbourhood of values (a HaloNet-style local mixing)."""

    def __init__(self, c=8):
        super().__init__()
        self.v, self.o, self.head = nn.Conv2d(3, c, 1), nn.Conv2d(c, c, 1), nn.Linear(c, 2)

    def forward(self, x):
        v = F.pad(self.v(x), (1, 1, 1, 1))
        win = v.unfold(2, 3, 1).unfold(3, 3, 1)  # (B, C, H, W, 3, 3)
        y = win.mean((-1, -2))
        return self.head(self.o(y).mean((2, 3)))


class Patches(nn.Module):
    """im2col, then a Linear over each patch's C*k*k entries (a patch embedding by hand)."""

    def __init__(self, c=6, d=5):
        super().__init__()
        self.conv, self.proj, self.head = nn.Conv2d(3, c, 3, padding=1), nn.Linear(c * 4, d), nn.Linear(d, 2)

    def forward(self, x):
        p = F.unfold(torch.relu(self.conv(x)), kernel_size=2, stride=2)  # (B, C*4, L)
        return self.head(self.proj(p.transpose(1, 2)).mean(1))


def test_windows_along_the_spatial_axes_keep_the_channels():
    masked, small, _ = masked_and_shrunk(Neighbourhoods().eval(), (2, 3, 6, 7))
    assert small.get_submodule("v").out_channels == 4
    assert n_params(small) == (4 * 3 + 4) + (4 * 4 + 4) + (2 * 4 + 2)
    x = torch.randn(3, 3, 9, 5)
    assert torch.allclose(small(x), masked(x), atol=1e-6)


def test_im2col_takes_each_channels_kernel_positions_with_it():
    masked, small, _ = masked_and_shrunk(Patches().eval(), (2, 3, 8, 6))
    kept = small.get_submodule("conv").out_channels
    assert kept == 3 and small.get_submodule("proj").in_features == kept * 4
    assert n_params(small) == (3 * 27 + 3) + (3 * 12 + 3) + (2 * 3 + 2)  # proj keeps 3 of its 5 too
    x = torch.randn(3, 3, 4, 10)
    assert torch.allclose(small(x), masked(x), atol=1e-6)


def test_windows_across_the_channels_keep_them_and_say_so():
    class AcrossChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 8), nn.Linear(6 * 3, 2)

        def forward(self, x):
            return self.head(self.fc(x).unfold(-1, 3, 1).flatten(-2))

    gm = surgery.capture(AcrossChannels().eval(), (torch.randn(2, 4),))
    [fc] = [g for g in surgery.channel_groups(gm) if g.size == 8]
    assert fc.frozen == "unfold at node 'unfold' takes windows across the channels' axis"


@pytest.mark.parametrize("batch", [1, 2])
def test_halonet_shrunk_at_one_batch_size_runs_at_another(batch):
    """timm's HaloNet unfolds its keys and values into neighbourhoods and holds batch x heads in
    one axis, whose length a reshape reads from another tensor. Shrink wrote the example's
    length there as a number, so the shrunk model raised at batch 3; now it stays a run-time
    size (-1, or the count scaled by new over old). At batch 1 the heads looked like channels of
    that axis, and the masks went there: the masked model raised at batch 3 too; now the axis,
    sized by the batch times a count, keeps its heads, as at batch 2."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("halonet26t", pretrained=False).eval()
    masked, small, _ = masked_and_shrunk(model, (batch, 3, 256, 256))
    assert n_params(small) == 4679716  # of 12480288
    x = torch.randn(3, 3, 256, 256)
    assert torch.allclose(small(x), masked(x), atol=1e-5)


class PatchTokens(nn.Module):
    """MobileViT's unfold and fold by reshapes: (B, C, H, W) -> (B*C*nh, ph, nw, pw) -> ... ->
    (B*P, N, C), a Linear over the channels as tokens, and back. The first reshape's length,
    B * C * nh, is read from the map at run time; nh through math.ceil, as timm writes it."""

    def __init__(self, c: int = 8, patch: int = 2):
        super().__init__()
        self.conv, self.mix, self.proj = nn.Conv2d(3, c, 1), nn.Linear(c, c), nn.Conv2d(c, 4, 1)
        self.patch = patch

    def forward(self, x):
        x = self.conv(x)
        p = self.patch
        B, C, H, W = x.shape
        nh, nw = math.ceil(H / p), math.ceil(W / p)
        x = x.reshape(B * C * nh, p, nw, p).transpose(1, 2)
        x = x.reshape(B, C, nh * nw, p * p).transpose(1, 3).reshape(B * p * p, nh * nw, -1)
        x = self.mix(x)
        x = x.contiguous().view(B, p * p, nh * nw, -1).transpose(1, 3).reshape(B * C * nh, nw, p, p)
        x = x.transpose(1, 2).reshape(B, C, nh * p, nw * p)
        return self.proj(x).mean((2, 3))


@pytest.mark.parametrize("batch", [1, 2])
def test_patches_unfolded_by_reshapes_keep_their_channels_prunable(batch):
    masked, small, _ = masked_and_shrunk(PatchTokens().eval(), (batch, 3, 8, 8))
    # conv 3x4+4, mix 4x4+4, proj 4x4+4 (of 32+8, 64+8, 32+4)
    assert n_params(small) == 16 + 20 + 20
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-6)
