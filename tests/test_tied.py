"""Tied weights (an output head holding its embedding's weight, as GPT-2 and T5 do) stay tied:
one group decision, one tensor after Shrink, and the tie visible in the result."""
import pytest
import torch
from torch import nn

import surgery
from passes import ChannelPrune, Shrink

from helpers import n_params


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 16, hidden: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h)


class TiedWithUnfollowedUse(TiedLM):
    """A third holder of the tied tensor reads all of it (its norm): no channel may go."""

    def __init__(self):
        super().__init__()
        self.ref = nn.Linear(16, 50, bias=False)
        self.ref.weight = self.emb.weight

    def forward(self, ids):
        return super().forward(ids) * self.ref.weight.norm()


class Gain(nn.Module):
    """A layer the channel rules know nothing of (kept a leaf in the trace)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x * self.weight.abs().mean()


class TiedWithOpaqueHolder(TiedLM):
    def __init__(self):
        super().__init__()
        self.gain = Gain(self.emb.weight)

    def forward(self, ids):
        return self.gain(super().forward(ids))


def test_tied_embedding_and_head_shrink_as_one_tensor():
    torch.manual_seed(0)
    model = TiedLM().eval()
    ids = torch.randint(0, 50, (2, 7))
    masked = surgery.compress(model, [ChannelPrune(ratio=0.5)], example_inputs=(ids,))
    small = surgery.compress(masked, [Shrink()], example_inputs=(ids,))
    assert small.head.weight is small.emb.weight
    assert tuple(small.emb.weight.shape) == (50, 8)
    assert small.head.in_features == 8 and small.emb.embedding_dim == 8
    # emb/head 50x8 (once) + fc1 8->16 + fc2 16->8
    assert n_params(small) == 50 * 8 + (8 * 16 + 16) + (16 * 8 + 8) == 680
    assert torch.allclose(small(ids), masked(ids), atol=1e-5)
    # the caller's model keeps its tie and its size
    assert model.head.weight is model.emb.weight and n_params(model) == 50 * 16 + 16 * 32 + 32 + 32 * 16 + 16


def test_tied_tensor_is_one_decision_in_the_channel_groups():
    model = TiedLM().eval()
    gm = surgery.capture(model, (torch.randint(0, 50, (2, 7)),))
    [stream] = [g for g in surgery.channel_groups(gm) if g.size == 16]
    assert stream.frozen is None
    names = {str(p.node.target) for p in stream.producers} | {str(p.node.target) for p in stream.readers}
    assert {"emb", "fc2", "head", "fc1"} <= names


def test_a_holder_whose_use_is_not_followed_keeps_the_tied_axis_whole():
    torch.manual_seed(0)
    model = TiedWithUnfollowedUse().eval()
    ids = torch.randint(0, 50, (2, 7))
    gm = surgery.capture(model, (ids,))
    [stream] = [g for g in surgery.channel_groups(gm) if g.size == 16]
    # torch.fx reads a tied tensor by its first name: emb.weight, read whole by norm()
    assert "node 'norm' reads 'emb.weight' as a whole tensor" in stream.frozen
    masked = surgery.compress(model, [ChannelPrune(ratio=0.5)], example_inputs=(ids,))
    small = surgery.compress(masked, [Shrink()], example_inputs=(ids,))
    assert small.emb.weight is small.head.weight
    assert tuple(small.emb.weight.shape) == (50, 16)
    assert small.fc1.out_features == 16  # the hidden layer still shrinks
    assert torch.allclose(small(ids), masked(ids), rtol=1e-5, atol=1e-4)


def test_a_tied_holder_the_rules_do_not_follow_keeps_the_tied_axis_whole():
    torch.manual_seed(0)
    model = TiedWithOpaqueHolder().eval()
    ids = torch.randint(0, 50, (2, 7))
    gm = surgery.capture(model, (ids,), leaf_modules=[Gain])
    [stream] = [g for g in surgery.channel_groups(gm) if g.size == 16]
    assert "emb.weight is tied to head.weight, gain.weight (one tensor)" in stream.frozen
    assert "gain.weight along axis 1 is not followed" in stream.frozen


def test_a_weight_read_whole_elsewhere_keeps_its_channels():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3)
            self.d = nn.Conv2d(8, 4, 3)

        def forward(self, x):
            return self.d(torch.relu(self.c(x))) * self.c.weight.norm()

    x = torch.randn(1, 3, 12, 12)
    [g, _] = surgery.channel_groups(surgery.capture(Net().eval(), (x,)))
    assert g.frozen == ("node 'norm' reads 'c.weight' as a whole tensor, which the channel rules do not follow "
                        "along axis 0")
    small = surgery.compress(Net().eval(), [ChannelPrune(ratio=0.5, select=(nn.Conv2d,)), Shrink()],
                             example_inputs=(x,))
    assert small.c.out_channels == 8


@pytest.mark.parametrize("cls", [nn.Embedding, nn.EmbeddingBag])
def test_embedding_channels_are_prunable_and_exact(cls):
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = cls(30, 12)
            self.out = nn.Linear(12, 5)

        def forward(self, ids):
            return self.out(self.emb(ids))

    ids = torch.randint(0, 30, (4, 6))
    masked = surgery.compress(Net().eval(), [ChannelPrune(ratio=0.5, select=cls)], example_inputs=(ids,))
    small = surgery.compress(masked, [Shrink()], example_inputs=(ids,))
    assert small.emb.weight.shape == (30, 6) and small.emb.embedding_dim == 6 and small.out.in_features == 6
    assert torch.allclose(small(ids), masked(ids), atol=1e-5)


def test_max_norm_embedding_keeps_its_channels():
    net = nn.Sequential(nn.Embedding(30, 12, max_norm=1.0), nn.Linear(12, 5)).eval()
    gm = surgery.capture(net, (torch.randint(0, 30, (4, 6)),))
    [g] = [g for g in surgery.channel_groups(gm) if g.size == 12]
    assert "max_norm" in g.frozen
