"""Recurrent layers (nn.LSTM, nn.GRU, nn.RNN) read their input's features through the first
layer's input weights: the features before them are pruned with those columns (both directions'),
and the module's input_size follows. Their hidden units feed back into the recurrence, so they
stay. Masked, shrunk, compared with the masked model at another batch and length."""
import pytest
import torch
from torch import nn

from helpers import masked_and_shrunk, n_params


class Tagger(nn.Module):
    """Features, a two-layer recurrent layer over the tokens, a per-token classifier."""

    def __init__(self, kind: str, bidirectional: bool, batch_first: bool = True):
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
        self.embed = nn.Linear(6, 8)
        self.rnn = cls(8, 5, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
        self.head = nn.Linear(10 if bidirectional else 5, 3)

    def forward(self, x):
        out, _ = self.rnn(torch.relu(self.embed(x)))
        return self.head(out)


@pytest.mark.parametrize("kind, bidirectional, before, after", [
    ("lstm", True, 1369, 1181), ("lstm", False, 614, 506), ("gru", True, 1049, 901),
    ("gru", False, 479, 391), ("rnn", True, 409, 341), ("rnn", False, 209, 161)])
def test_the_features_a_recurrent_layer_reads_are_pruned_with_its_input_weights(kind, bidirectional, before, after):
    torch.manual_seed(0)
    model = Tagger(kind, bidirectional).eval()
    masked, small, _ = masked_and_shrunk(model, (2, 7, 6))
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[kind] * 5
    # the embedding loses 4 of its 8 features, and each direction's input weights 4 columns
    assert (n_params(model), n_params(small)) == (before, after)
    assert before - after == 4 * 7 + 4 * gates * (2 if bidirectional else 1)
    assert small.rnn.input_size == 4 and small.rnn.weight_ih_l0.shape == (gates, 4)
    x = torch.randn(3, 4, 6)
    assert torch.allclose(small(x), masked(x), atol=1e-6)


def test_time_major_input_is_pruned_alike():
    torch.manual_seed(0)
    masked, small, _ = masked_and_shrunk(Tagger("lstm", True, batch_first=False).eval(), (7, 2, 6))
    assert small.rnn.input_size == 4
    x = torch.randn(5, 3, 6)
    assert torch.allclose(small(x), masked(x), atol=1e-6)
