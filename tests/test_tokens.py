"""Token streams, pruned exactly: a position table added to the tokens, MLP-Mixer's Linear over
the tokens (a bias that needs its own mask), class tokens counted or joined along the tokens'
axis. Each model is masked by ChannelPrune and shrunk as in test_streams (its ``_prune`` checks
the shrunk model against the masked one on fresh inputs)."""
import torch
from helpers import n_params
from test_streams import _prune
from torch import nn

import surgery


class WithPositions(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.pos = nn.Linear(4, 8), nn.Parameter(torch.randn(5, 8))
        self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.embed(x) + self.pos))


def test_a_mask_goes_after_a_position_embedding_too():
    masked, small = _prune(WithPositions(), torch.randn(2, 5, 4))
    assert small.get_submodule("embed").out_features == 4 and small.pos.shape == (5, 4)


class MixerBlock(nn.Module):
    """MLP-Mixer's block: a Linear over the tokens mixes each channel's positions (channel-local),
    its bias making a masked channel nonzero on the stream; the channel MLP reads the stream."""

    def __init__(self, tokens=6, d=8):
        super().__init__()
        self.embed, self.tok, self.fc = nn.Linear(4, d), nn.Linear(tokens, tokens), nn.Linear(d, d)
        self.norm1, self.norm2, self.head = nn.LayerNorm(d), nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.tok(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.fc(self.norm2(x))
        return self.head(x.mean(1))


def test_a_biased_linear_over_the_tokens_takes_a_mask_so_the_stream_goes():
    x = torch.randn(2, 6, 4)
    gm = surgery.capture(MixerBlock(), (x,))
    (stream,) = [g for g in surgery.channels.channel_groups(gm) if g.size == 8 and not g.frozen]
    assert ("tok", -2) in {(p.node.name, p.dim) for p in stream.mask_points()}
    masked, small = _prune(MixerBlock(), x)
    # the stream keeps 4 of 8: embed 4x4+4, the norms 2x(4+4), tok whole (6x6+6), fc 4x4+4, head 3x4+3
    assert n_params(MixerBlock()) == 40 + 32 + 42 + 72 + 27
    assert n_params(small) == 20 + 16 + 42 + 20 + 15


class CountedClassToken(nn.Module):
    """PiT's tokens: the class token, expanded to the batch, is counted (``shape[1]``) as well as
    joined to the patch tokens; the count reads the tokens' axis, not the channels'."""

    def __init__(self, d=8):
        super().__init__()
        self.embed, self.norm, self.head = nn.Linear(4, d), nn.LayerNorm(d), nn.Linear(d, 3)
        self.cls = nn.Parameter(torch.randn(1, 1, d))

    def forward(self, x):
        cls = self.cls.expand(x.shape[0], -1, -1)
        n = cls.shape[1]
        x = self.norm(torch.cat((cls, self.embed(x)), dim=1))
        return self.head(x[:, :n].squeeze(1))


def test_a_class_token_whose_count_of_tokens_is_read_still_loses_channels():
    masked, small = _prune(CountedClassToken(), torch.randn(2, 5, 4))
    assert small.cls.shape == (1, 1, 4) and small.get_submodule("embed").out_features == 4


class ClassTokenSwap(nn.Module):
    """CrossViT's fusion: a class token projected from elsewhere joins the stream's patch tokens
    (a cat along the tokens), and a LayerNorm reads the result. Both parts are zero where masked,
    so the join is too, and the stream goes through the norm."""

    def __init__(self, d=8):
        super().__init__()
        self.embed, self.proj = nn.Linear(4, d), nn.Linear(d, d)
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        x = torch.cat((self.proj(x[:, :1]), x[:, 1:]), dim=1)
        return self.head(self.norm(x) + x)


def test_tokens_joined_along_another_axis_keep_the_zeros_they_share():
    masked, small = _prune(ClassTokenSwap(), torch.randn(2, 5, 4))
    assert small.get_submodule("norm").weight.shape == (4,)  # before: kept whole ("reads a nonzero value")
    assert n_params(small) == (4 * 4 + 4) + (4 * 4 + 4) + 2 * 4 + (3 * 4 + 3)
