"""Ops that copy entries or assert sizes, as GCViT uses them: ``repeat_interleave`` along the
batch or along the channels, timm's ``window_reverse`` taking windows of tokens back to a map
(another rank, the channels last in both), and ``_assert(x.shape[-1] == y.shape[-1])`` on two
counts of the same channels. Each used to keep its channels; each now prunes exactly."""
import warnings

import torch
from helpers import n_params
from timm.models.gcvit import window_partition, window_reverse
from torch import nn

import surgery
from passes import ChannelPrune, Shrink
from surgery.verify import max_abs_diff, run_eval


def _prune(model: nn.Module, x: torch.Tensor, x2: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = surgery.compress(model.eval(), [ChannelPrune(ratio=0.5)], (x,))
        small = surgery.compress(masked, [Shrink()], (x,))
    assert max_abs_diff(run_eval(masked, (x2,)), run_eval(small, (x2,))) < 1e-5
    return small


class Interleaved(nn.Module):
    """A query repeated along the batch for each of 2 windows (channels pass), then each channel
    repeated twice in a row along the channels (each a pair of the next layer's inputs)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(16, 6), nn.Linear(6, 3)

    def forward(self, x):  # x: (B, 4)
        q = self.a(x).repeat_interleave(2, dim=0)  # (2B, 8)
        return self.head(self.b(torch.relu(q).repeat_interleave(2, dim=1)))


def test_repeat_interleave_passes_channels_along_the_batch_and_doubles_them_along_their_axis():
    torch.manual_seed(0)
    small = _prune(Interleaved(), torch.randn(2, 4), torch.randn(3, 4))
    # a keeps 4 of 8, b reads their 8 copies and keeps 3 of 6: a 4x4+4, b 3x8+3, head 3x3+3
    assert (n_params(Interleaved()), n_params(small)) == (40 + 102 + 21, 20 + 27 + 12)


class Windows(nn.Module):
    """GCViT's window attention's frame: a map cut into windows of tokens, a Linear per token, the
    windows joined back into the map by timm's window_reverse (rank 3 to rank 4)."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):  # x: (B, 4, 4, 3)
        y = self.embed(x)
        w = window_partition(y, (2, 2))
        w = self.mix(w.reshape(w.shape[0], 4, w.shape[-1]))
        y = y + window_reverse(w, (2, 2), (4, 4))  # (windows, 4 tokens, C) -> (B, 4, 4, C)
        return self.head(y.mean((1, 2)))


def test_window_reverse_to_another_rank_keeps_the_channels_last():
    torch.manual_seed(0)
    small = _prune(Windows(), torch.randn(1, 4, 4, 3), torch.randn(2, 4, 4, 3))
    # the stream keeps 4 of 8: embed 4x3+4, mix 4x4+4, head 2x4+2
    assert (n_params(Windows()), n_params(small)) == (32 + 72 + 18, 16 + 20 + 10)


class Asserted(nn.Module):
    """Two branches of the same channels whose widths the model asserts equal before joining them."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        p, q = self.a(x), self.b(x)
        torch._assert(p.shape[-1] == q.shape[-1], "the branches must be as wide")
        return self.head(torch.relu(p + q))


def test_an_assert_that_two_counts_of_the_same_channels_agree_keeps_nothing():
    torch.manual_seed(0)
    small = _prune(Asserted(), torch.randn(2, 4), torch.randn(5, 4))
    # a and b keep 4 of 8 together: 2 x (4x4+4), head 3x4+3
    assert (n_params(Asserted()), n_params(small)) == (40 + 40 + 27, 20 + 20 + 15)
