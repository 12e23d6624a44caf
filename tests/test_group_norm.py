"""GroupNorm on a normalised stream: one group (PoolFormer's, timm's GroupNorm1) or several (a
detection head's), as a module or through ``F.group_norm``. Shrink writes the norm with each
group's original divisor; the shrunk model must equal the masked one at other image sizes and
have the parameter count the kept widths give."""
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import surgery
from passes import ChannelPrune, Shrink
from helpers import n_params
from test_streams import _prune


class PoolFormerBlock(nn.Module):
    """PoolFormer's block, twice: a one-group GroupNorm over (C, H, W) before token mixing (a
    pooling) and before a 1x1-conv MLP, both on the residual stream; the module form
    (Hugging Face's PoolFormerGroupNorm) or the functional one (timm's GroupNorm1)."""

    def __init__(self, c=8, functional=False, groups=1):
        super().__init__()
        self.stem, self.functional = nn.Conv2d(3, c, 3, padding=1), functional
        self.n1, self.n2 = nn.GroupNorm(groups, c), nn.GroupNorm(groups, c)
        self.fc1, self.fc2, self.head = nn.Conv2d(c, 2 * c, 1), nn.Conv2d(2 * c, c, 1), nn.Linear(c, 3)
        for n in (self.n1, self.n2):
            nn.init.normal_(n.weight)
            nn.init.normal_(n.bias)

    def norm(self, n, x):
        return F.group_norm(x, n.num_groups, n.weight, n.bias, n.eps) if self.functional else n(x)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.n1, x)
        x = x + (F.avg_pool2d(y, 3, 1, 1, count_include_pad=False) - y)
        x = x + self.fc2(F.gelu(self.fc1(self.norm(self.n2, x))))
        return self.head(x.mean((2, 3)))


def test_a_one_group_groupnorm_keeps_its_divisor_over_the_kept_channels():
    from surgery.norms import emit_group_norm
    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 6) + 0.3
    x[:, 5:] = 0  # the channels a mask zeroed
    w, b = torch.randn(8), torch.randn(8)
    g = fx.Graph()
    p = g.placeholder("x")
    gw, gb = g.get_attr("w"), g.get_attr("b")
    node = g.call_function(F.group_norm, (p, 1, gw, gb))
    p.meta["shape"] = x[:, :5].shape
    emit_group_norm(node, p, 8, 5, gw, gb, 1e-5)
    g.output(node)
    root = nn.Module()
    root.w, root.b = nn.Parameter(w[:5]), nn.Parameter(b[:5])
    got = fx.GraphModule(root, g)(x[:, :5])
    assert torch.allclose(got, F.group_norm(x, 1, w, b, 1e-5)[:, :5], atol=1e-5)
    assert (F.group_norm(x[:, :5], 1, w[:5], b[:5], 1e-5) - got).abs().max() > 0.05  # the naive norm is off


@pytest.mark.parametrize("functional", [False, True])
def test_a_stream_through_one_group_groupnorms_is_pruned_exactly(functional):
    x = torch.randn(2, 3, 7, 9)
    masked, small = _prune(PoolFormerBlock(functional=functional), x)
    assert small.stem.out_channels == 4 and small.fc1.out_channels == 8
    assert n_params(small) == (4 * 3 * 9 + 4) + 2 * (4 + 4) + (8 * 4 + 8) + (4 * 8 + 4) + (4 * 3 + 3)
    x2 = torch.randn(1, 3, 11, 4)  # another size: the divisor is a ratio of channels, not a count of values
    assert torch.allclose(masked(x2), small(x2), atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = surgery.compress(PoolFormerBlock(functional=functional).eval(),
                                [ChannelPrune(0.5, normalised=False), Shrink()], (x,))
    assert kept.stem.out_channels == 8  # the norms read the stream: with normalised=False it stays
    if not functional:  # a GroupNorm module of fewer channels would divide by fewer: refused, named
        with pytest.raises(surgery.SurgeryError, match="GroupNorm 'n1' normalises pruned channels"):
            surgery.compress(PoolFormerBlock().eval(), [ChannelPrune(0.5), Shrink(into="modules")], (x,))


@pytest.mark.parametrize("functional", [False, True])
def test_a_groupnorm_of_several_groups_loses_the_same_count_from_each(functional):
    x = torch.randn(2, 3, 7, 9)
    masked, small = _prune(PoolFormerBlock(c=8, functional=functional, groups=2), x)
    kept = small.n1.weight.shape[0]
    assert kept in (2, 4, 6) and small.stem.out_channels == kept  # as many from each group of four
    assert n_params(small) == (kept * 3 * 9 + kept) + 2 * (2 * kept) + (8 * kept + 8) + (kept * 8 + kept) + \
        (kept * 3 + 3)
    x2 = torch.randn(1, 3, 5, 6)
    assert torch.allclose(masked(x2), small(x2), atol=1e-5)
