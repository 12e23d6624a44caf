"""What Shrink keeps of a graph beyond its masks: where a group's mask goes when an op on the stream
makes a zero channel a constant, and calls a model makes for what they do in place."""
from __future__ import annotations

import torch
from helpers import n_params, randomise_norms
from torch import Tensor, nn

import surgery
from passes import ChannelPrune, Shrink
from surgery.verify import max_rel_diff, run_eval


def _add_tail_in_place(x: Tensor, y: Tensor) -> Tensor:
    """torchvision MViT's _add_shortcut: called for what it does to x."""
    x[:, 1:] += y[:, 1:]
    return x


torch.fx.wrap("_add_tail_in_place")


class InPlaceLeafCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.up, self.down = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x):
        y = self.a(x)
        _add_tail_in_place(y, self.b(x))  # the result is not used: y is changed in place
        return self.down(torch.relu(self.up(torch.relu(y))))


def test_a_leaf_function_called_for_its_in_place_effect_survives_shrink():
    torch.manual_seed(0)
    model, x = InPlaceLeafCall().eval(), torch.randn(3, 4)
    masked = surgery.compress(model, [ChannelPrune(0.5)], example_inputs=(x,))
    small = surgery.compress(masked, [Shrink()], example_inputs=(x,))  # raised ShrinkMismatch when dropped
    x2 = torch.randn(5, 4)
    assert torch.allclose(run_eval(small, (x2,)), run_eval(masked, (x2,)), atol=1e-6)
    assert small.up.in_features == 6 and small.down.in_features == 4  # y's channels stay, up's half go


class RepVGGBlock(nn.Module):
    """RepVGG/MobileOne's training-time block: 3x3 and 1x1 conv-BN branches plus a BN of the input."""

    def __init__(self, c):
        super().__init__()
        self.kxk, self.kxk_bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.one, self.one_bn = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.skip = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.kxk_bn(self.kxk(x)) + self.one_bn(self.one(x)) + self.skip(x))


def test_a_batchnorm_on_the_stream_gets_the_groups_mask_so_its_constant_goes_too():
    """BN(0) is a constant, which the next zero-padded conv cannot fold: a mask after the identity
    branch's BN makes the channel zero there too, and it leaves exactly."""
    torch.manual_seed(0)
    net = randomise_norms(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), RepVGGBlock(8), RepVGGBlock(8),
                                   nn.Flatten(), nn.Linear(8 * 6 * 6, 2)))
    x = torch.randn(2, 3, 6, 6)
    masked = surgery.compress(net.eval(), [ChannelPrune(0.5)], example_inputs=(x,))
    small = surgery.compress(masked, [Shrink()], example_inputs=(x,))
    x2 = torch.randn(3, 3, 6, 6)
    assert max_rel_diff(run_eval(masked, (x2,)), run_eval(small, (x2,))) < 1e-4
    block = 4 * 4 * 9 + 4 * 4 + 3 * 2 * 4  # two convs, three BNs (weight, bias) of 4 channels
    assert n_params(small) == (3 * 4 * 9 + 4) + 2 * block + (4 * 36 * 2 + 2)
