"""Patterns met in detection transformers (Hugging Face's DETR family, YOLOS) and in ViTs run at
other image sizes, each in miniature: object queries read whole, frozen BatchNorms computed from
their buffers, position tables resized to the image, a head size computed from a written head
count, deformable sampling. Pruned exactly, with the parameter count the kept widths give (see
test_streams for the helper's checks)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from passes import ChannelPrune, Shrink
from helpers import n_params
from test_streams import _prune


class _ObjectQueries(nn.Module):
    """DETR's decoder in miniature: learned object queries (an Embedding's table, read whole),
    repeated per image and added to the decoder's stream before each layer, which starts at zero;
    the encoder's memory reaches the stream through a Linear."""

    def __init__(self, d=8, queries=5):
        super().__init__()
        self.query, self.memory = nn.Embedding(queries, d), nn.Linear(6, d)
        self.l1, self.l2, self.norm, self.head = nn.Linear(d, d), nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x):
        pos = self.query.weight.unsqueeze(0).repeat(x.size(0), 1, 1)
        h = torch.zeros_like(pos) + self.memory(x).mean(1, keepdim=True)
        h = h + self.l1(h + pos)
        return self.head(self.norm(h + self.l2(h + pos)))


def test_object_queries_read_whole_are_channels_of_the_decoder_stream():
    x = torch.randn(2, 4, 6)
    gm = surgery.capture(_ObjectQueries().eval(), (x,))
    (stream,) = [g for g in surgery.channel_groups(gm) if g.size == 8]
    assert stream.frozen is None and "query_weight" in [p.node.name for p in stream.producers]
    masked, small = _prune(_ObjectQueries(), x)
    assert small.query.weight.shape == (5, 4) and small.query.embedding_dim == 4
    assert n_params(small) == 5 * 4 + (6 * 4 + 4) + 2 * (4 * 4 + 4) + 2 * 4 + (4 * 3 + 3)
    x3 = torch.randn(3, 4, 6)  # the repeat follows the batch size
    assert torch.allclose(masked(x3), small(x3), atol=1e-5)


class _FrozenNorm(nn.Module):
    """DETR's ``DetrFrozenBatchNorm2d``: its scale and shift computed in forward from four tensors
    (buffers, or parameters that do not train), each read whole and reshaped per channel."""

    def __init__(self, c, as_parameters):
        super().__init__()
        g = torch.Generator().manual_seed(c)
        tensors = dict(weight=torch.rand(c, generator=g) + 0.5, bias=torch.randn(c, generator=g),
                       running_mean=torch.randn(c, generator=g), running_var=torch.rand(c, generator=g) + 0.5)
        for k, v in tensors.items():
            if as_parameters:
                self.register_parameter(k, nn.Parameter(v, requires_grad=False))
            else:
                self.register_buffer(k, v)

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + bias


class _FrozenBackbone(nn.Module):
    """A backbone of frozen norms, traced with values beside the proxies (its ``if`` on a size
    defeats plain fx), which makes the norms' buffers graph inputs rather than constants."""

    def __init__(self, as_parameters=False):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1), _FrozenNorm(8, as_parameters)
        self.c2, self.n2 = nn.Conv2d(8, 6, 3, padding=1), _FrozenNorm(6, as_parameters)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        if x.shape[-1] > 4:
            x = F.max_pool2d(x, 2)
        h = torch.relu(self.n2(self.c2(torch.relu(self.n1(self.c1(x))))))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("as_parameters", [False, True])
def test_a_frozen_norm_computed_from_several_tensors_is_cut_through_all_of_them(as_parameters):
    x = torch.randn(2, 3, 8, 8)
    gm = surgery.capture(_FrozenBackbone(as_parameters).eval(), (x,))
    assert any(n.op == "get_attr" and n.target.endswith("running_var") for n in gm.graph.nodes)
    assert all(g.frozen is None for g in surgery.channel_groups(gm) if g.size in (8, 6))
    masked, small = _prune(_FrozenBackbone(as_parameters), x)
    assert [tuple(getattr(small.n1, k).shape) for k in ("weight", "bias", "running_mean", "running_var")] == [(4,)] * 4
    assert small.n2.running_var.shape == (3,)
    kept = 4 * 3 * 9 + 4 + 3 * 4 * 9 + 3 + 3 * 2 + 2
    assert n_params(small) == kept + (4 * 4 + 4 * 3 if as_parameters else 0)
    x3 = torch.randn(3, 3, 10, 10)
    assert torch.allclose(masked(x3), small(x3), atol=1e-5)


class _ResampledPositions(nn.Module):
    """A ViT embedding whose position table is resized to the image (Hugging Face's ViT with
    ``interpolate_pos_encoding=True``, Dinov2 and YOLOS always): the grid part of the table viewed
    as an image, interpolated, flattened back and joined to the class token's row."""

    def __init__(self, d=8, grid=2, patch=4):
        super().__init__()
        self.patch, self.grid = nn.Conv2d(3, d, patch, stride=patch), grid
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 1 + grid * grid, d))
        self.mlp, self.norm, self.head = nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, 3)

    def forward(self, x):
        h, w = x.shape[2] // 4, x.shape[3] // 4
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat((self.cls.expand(x.shape[0], -1, -1), tokens), dim=1)
        d = tokens.shape[-1]  # as Hugging Face's ViT reads it: the stream's width, at run time
        grid = self.pos[:, 1:].reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        pos = torch.cat((self.pos[:, :1], grid.flatten(2).transpose(1, 2)), dim=1)
        t = tokens + pos
        t = t + self.mlp(self.norm(t))
        return self.head(t[:, 0])


def test_a_position_table_resized_to_the_image_loses_channels_with_the_stream():
    x = torch.randn(2, 3, 12, 16)  # a 3 x 4 grid of patches, from a table of 2 x 2
    masked, small = _prune(_ResampledPositions(), x)
    assert small.pos.shape == (1, 5, 4) and small.cls.shape == (1, 1, 4)
    assert n_params(small) == (4 * 3 * 16 + 4) + 4 + 5 * 4 + (4 * 4 + 4) + 2 * 4 + (4 * 3 + 3)
    x2 = torch.randn(1, 3, 8, 20)  # another image size: the interpolation follows it
    assert torch.allclose(masked(x2), small(x2), atol=1e-5)


def test_timm_dynamic_image_size_resamples_a_position_table_cut_with_the_stream():
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              num_heads=3, dynamic_img_size=True, num_classes=5).eval()
    x = torch.randn(2, 3, 48, 40)  # not the table's 4 x 4 grid
    gm = surgery.capture(model, (x,))
    assert any(getattr(n.target, "__name__", "") == "resample_abs_pos_embed" for n in gm.graph.nodes)
    (stream,) = [g for g in surgery.channel_groups(gm) if g.size == 192]
    assert stream.frozen is None
    masked, small = _prune(model, x)
    assert small.pos_embed.shape == (1, 17, 96)


class _ExpandedHeads(nn.Module):
    """Conditional DETR's cross-attention: each head's query is its content part joined to its
    position part, and the doubled head size is computed at run time, ``C // heads``, beside a
    written head count. Pruning heads would change that count behind the division's back."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.qc, self.qp, self.kc, self.kp, self.v, self.o = (nn.Linear(d, d) for _ in range(6))

    def forward(self, x):
        b, n, _ = x.shape
        split = (b, n, self.heads, self.hd)
        q = torch.cat([self.qc(x).view(split), self.qp(x).view(split)], -1).view(b, n, -1)
        k = torch.cat([self.kc(x).view(split), self.kp(x).view(split)], -1).view(b, n, -1)
        size = q.shape[-1] // self.heads
        q, k = (t.view(b, n, self.heads, size).transpose(1, 2) for t in (q, k))
        v = self.v(x).view(split).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.o(a.transpose(1, 2).reshape(b, n, -1))


def test_a_head_size_computed_from_a_written_head_count_keeps_the_heads():
    x = torch.randn(2, 5, 8)
    gm = surgery.capture(_ExpandedHeads().eval(), (x,))
    (heads,) = [g for g in surgery.channel_groups(gm) if g.size == 2]
    assert "'floordiv', a number computed from its channel count" in heads.frozen
    _, small = _prune(_ExpandedHeads(), x)  # before: Shrink cut the written count and refused its result
    assert n_params(small) == n_params(_ExpandedHeads())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = surgery.compress(_ExpandedHeads().eval(), [ChannelPrune(0.5, attention="head_dims")], (x,))
        small = surgery.compress(masked, [Shrink()], (x,))
    # each head narrower instead: the computed size follows the width it divides
    assert [small.get_submodule(k).out_features for k in ("qc", "qp", "kc", "kp", "v")] == [4] * 5
    x2 = torch.randn(3, 4, 8)
    assert torch.allclose(masked(x2), small(x2), atol=1e-6)


class _Sampled(nn.Module):
    """Deformable attention's sampling in miniature: values projected, split into heads merged
    into the batch axis, each head sampled at its own predicted points by ``F.grid_sample``,
    then projected out."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.value, self.offsets, self.out = nn.Conv2d(d, d, 1), nn.Linear(d, heads * 3 * 2), nn.Conv2d(d, 4, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        v = self.value(x).view(b * self.heads, c // self.heads, h, w)
        grid = torch.tanh(self.offsets(x.mean((2, 3)))).view(b * self.heads, 3, 1, 2)
        s = F.grid_sample(v, grid, align_corners=False)  # (b * heads, c // heads, 3, 1)
        return self.out(s.reshape(b, c, 3, 1))


def test_grid_sample_passes_channels_and_keeps_its_grid_and_per_entry_heads():
    x = torch.randn(2, 8, 5, 6)
    gm = surgery.capture(_Sampled().eval(), (x,))
    frozen = {g.size: g.frozen for g in surgery.channel_groups(gm) if g.frozen}
    assert "reads these channels as sampling coordinates" in frozen[12]
    masked, small = _prune(_Sampled(), x)
    # the same dims of both heads go (the view into heads stays rectangular); the offsets stay
    kept = small.value.out_channels
    assert kept in (4, 6) and small.out.in_channels == kept and small.offsets.out_features == 12
    assert n_params(small) == (8 * kept + kept) + (8 * 12 + 12) + (kept * 4 + 4)
