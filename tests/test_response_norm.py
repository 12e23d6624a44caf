"""Global response norm (ConvNeXt-V2): a vector norm over the positions, its mean over the
channels, and ``addcmul`` applying the weight and bias. The MLP's hidden channels go through it
exactly: the norm is channel-local, the mean keeps its divisor, and the bias (which makes a removed
channel nonzero) is cut with them. Vector norms across the channels read the kept ones as a sum
does; other norms freeze them, named."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from helpers import masked_and_shrunk, n_params


class GRN(nn.Module):
    """timm's GlobalResponseNorm (channels last) or Hugging Face's ConvNextV2GRN (`hf`)."""

    def __init__(self, c: int, hf: bool = False):
        super().__init__()
        self.hf = hf
        self.weight, self.bias = nn.Parameter(torch.randn(c)), nn.Parameter(torch.randn(c))

    def forward(self, x):
        if self.hf:
            g = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
            n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
            return self.weight * (x * n) + self.bias + x
        g = x.norm(p=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return x + torch.addcmul(self.bias.view(1, 1, 1, -1), self.weight.view(1, 1, 1, -1), x * n)


class Block(nn.Module):
    """A ConvNeXt-V2 block without its LayerNorm: depthwise conv, channels-last MLP with a GRN
    between its layers, residual; then a classifier over the pooled stream."""

    def __init__(self, c: int = 8, hf: bool = False):
        super().__init__()
        self.stem, self.dw = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.fc1, self.grn, self.fc2 = nn.Linear(c, 4 * c), GRN(4 * c, hf), nn.Linear(4 * c, c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.grn(F.gelu(self.fc1(y))))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("hf", [False, True])
def test_the_hidden_channels_and_the_stream_go_through_a_global_response_norm(hf):
    torch.manual_seed(0)
    model = Block(hf=hf).eval()
    masked, small, _ = masked_and_shrunk(model, (2, 3, 9, 10))
    assert small.get_submodule("grn").weight.shape == (16,)  # 32 hidden channels, half kept
    assert small.get_submodule("fc1").weight.shape == (16, 4)  # and half the stream
    # stem 3->4 (3x3), depthwise 4 (7x7), fc1 4->16, GRN 16 + 16, fc2 16->4, head 4->3
    assert n_params(small) == (4 * 27 + 4) + (4 * 49 + 4) + (16 * 4 + 16) + 32 + (4 * 16 + 4) + (3 * 4 + 3)
    x = torch.randn(3, 3, 13, 6)  # another batch and image size: the mean over channels keeps 32
    assert torch.allclose(small(x), masked(x), atol=1e-5)
    assert not torch.allclose(masked(x), model(x), atol=1e-3)  # something was removed


class NormAcross(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p, self.fc1, self.fc2 = p, nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.p == "spectral":  # a matrix norm over (tokens, channels)
            scale = torch.linalg.norm(h, ord=2, dim=(1, 2), keepdim=True)
        else:
            scale = h.norm(p=self.p, dim=-1, keepdim=True)
        return self.fc2(h) * scale


@pytest.mark.parametrize("p", [1, 2, float("inf")])
def test_a_vector_norm_across_the_channels_reads_the_kept_ones(p):
    torch.manual_seed(0)
    masked, small, _ = masked_and_shrunk(NormAcross(p).eval(), (2, 5, 4))
    assert small.fc1.weight.shape == (4, 4)
    x = torch.randn(3, 7, 4)
    assert torch.allclose(small(x), masked(x), atol=1e-5)


@pytest.mark.parametrize("p, op", [(-1, "norm"), ("spectral", "norm")])
def test_other_norms_across_the_channels_keep_them_and_say_so(p, op):
    gm = surgery.capture(NormAcross(p).eval(), (torch.randn(2, 5, 4),))
    [hidden] = [g for g in surgery.channel_groups(gm) if g.size == 8]
    assert hidden.frozen is not None and "reduces across these channels" in hidden.frozen and op in hidden.frozen
