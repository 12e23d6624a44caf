"""A softmax over an axis that channels vary along, with other axes carrying them too: SKNet's
attention over its paths, (B, paths, C, 1, 1). Each slice it normalises is one unit, so channel c
goes from every path at once and the stream loses it exactly; a softmax across the channels
alone still keeps them."""
import torch
import torch.nn.functional as F
from torch import nn

import surgery

from helpers import masked_and_shrunk, n_params


class SelectiveKernel(nn.Module):
    """Two paths (3x3 and dilated 3x3) weighed per channel by a softmax over the paths."""

    def __init__(self, c: int = 16, hidden: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.paths = nn.ModuleList([nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=2, dilation=2)])
        self.reduce, self.select = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, 2 * c, 1)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        paths = torch.stack([F.relu(p(x)) for p in self.paths], dim=1)  # (B, 2, C, H, W)
        attn = self.select(F.relu(self.reduce(paths.sum(1).mean((2, 3), keepdim=True))))
        b, c2 = attn.shape[:2]
        attn = torch.softmax(attn.view(b, 2, c2 // 2, 1, 1), dim=1)
        return self.head((paths * attn).sum(1).mean((2, 3)))


def test_a_softmax_over_the_paths_takes_each_channel_from_every_path():
    torch.manual_seed(0)
    masked, small, _ = masked_and_shrunk(SelectiveKernel().eval(), (2, 3, 8, 8))
    x2 = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(small(x2), masked(x2), atol=1e-5)
    # every width halves: stem 3*8+8, paths 2*(8*8*9+8), reduce 8*4+4, select 4*16+16, head 8*4+4
    assert small.select.out_channels == 16 and small.get_submodule("paths.0").out_channels == 8
    assert n_params(small) == 32 + 2 * 584 + 36 + 80 + 36


class AcrossChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(6, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.out(torch.softmax(self.fc(x), dim=-1))


def test_a_softmax_across_the_channels_alone_keeps_them():
    gm = surgery.capture(AcrossChannels().eval(), (torch.randn(2, 6),))
    reasons = {g.frozen for g in surgery.channel_groups(gm)}
    assert "softmax at node 'softmax' normalises across these channels" in reasons
