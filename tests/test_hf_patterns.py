"""Patterns met in Hugging Face task models and timm models, each in miniature: pruned exactly,
with the parameter count that the kept widths give (see test_streams for the helper's checks)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from passes import ChannelPrune, Shrink
from helpers import n_params
from test_streams import _prune


class _InlineActivation(nn.Module):
    """DistilBERT's classification head: ``nn.ReLU()(x)``, a module built inside forward."""

    def __init__(self):
        super().__init__()
        self.pre, self.out = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(nn.ReLU()(self.pre(x)))


def test_a_module_built_inside_forward_is_traced_as_its_ops():
    model, x = _InlineActivation().eval(), torch.randn(4, 8)
    gm = surgery.capture(model, (x,))
    assert gm.meta["surgery"]["opaque"] == {}
    assert any(n.target in (torch.relu, F.relu) for n in gm.graph.nodes)
    assert torch.equal(gm(x), model(x))
    _, small = _prune(model, x)
    assert n_params(small) == 8 * 8 + 8 + 8 * 3 + 3


class _FactorisedEmbedding(nn.Module):
    """ALBERT's and ELECTRA's embeddings: narrower than the stream, normalised, then projected.
    Only embeddings produce that width, so ChannelPrune must select them by default."""

    def __init__(self, vocab=20, e=8, d=12):
        super().__init__()
        self.words, self.positions = nn.Embedding(vocab, e), nn.Embedding(10, e)
        self.norm, self.proj, self.head = nn.LayerNorm(e), nn.Linear(e, d), nn.Linear(d, 2)

    def forward(self, ids):
        h = self.norm(self.words(ids) + self.positions.weight[: ids.shape[1]])
        return self.head(torch.tanh(self.proj(h)))


def test_a_width_only_embeddings_produce_is_pruned_by_default():
    ids = torch.randint(0, 20, (2, 6))
    _, small = _prune(_FactorisedEmbedding(), ids)
    e, d = 4, 6
    assert n_params(small) == 20 * e + 10 * e + 2 * e + e * d + d + d * 2 + 2
    masked = surgery.compress(_FactorisedEmbedding().eval(), [ChannelPrune(0.5, exclude=nn.Embedding)], (ids,))
    small = surgery.compress(masked, [Shrink()], (ids,))
    assert small.get_submodule("words").weight.shape == (20, 8)  # excluded: nothing else produces it


class _ClassToken(nn.Module):
    """CLIP's vision embeddings: a 1-D class embedding expanded to (B, 1, D) and put in front of
    the patches; Dinov2's reads the position table's length (not its width) to decide whether to
    interpolate it."""

    def __init__(self, d=8):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 4, 4)
        self.cls = nn.Parameter(torch.randn(d))
        self.pos = nn.Parameter(torch.randn(1, 5, d))
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):
        p = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(x.shape[0], 1, -1), p], dim=1)
        if h.shape[1] - 1 == self.pos.shape[1] - 1:  # the table's length: no channel is read
            h = h + self.pos
        h = h + self.fc(torch.relu(h))
        return self.head(h[:, 0])


def test_a_class_embedding_and_a_position_table_lose_channels_with_the_stream():
    x = torch.randn(2, 3, 8, 8)
    gm = surgery.capture(_ClassToken().eval(), (x,))
    assert [g.frozen for g in surgery.channel_groups(gm)] == [None, "reaches the model output through 'head'"]
    _, small = _prune(_ClassToken(), x)
    d = 4
    assert small.get_parameter("cls").shape == (d,) and small.get_parameter("pos").shape == (1, 5, d)
    assert n_params(small) == 3 * 16 * d + d + d + 5 * d + d * d + d + d * 3 + 3


class _MaskedScores(nn.Module):
    """DeBERTa fills masked attention scores with the dtype's minimum (``masked_fill``)."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads, self.q, self.k, self.v, self.o = heads, *(nn.Linear(d, d) for _ in range(4))

    def forward(self, x, keep):
        b, n, d = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = (q @ k.transpose(-1, -2)).masked_fill(~keep[:, None, None, :], torch.finfo(x.dtype).min)
        out = scores.softmax(-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, n, d))


def test_masked_fill_on_attention_scores_keeps_the_heads_prunable():
    x, keep = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    gm = surgery.capture(_MaskedScores().eval(), (x, keep))
    heads = [g for g in surgery.channel_groups(gm) if g.size == 2]
    assert len(heads) == 1 and heads[0].frozen is None
    masked = surgery.compress(_MaskedScores().eval(), [ChannelPrune(0.5)], (x, keep))
    small = surgery.compress(masked, [Shrink()], (x, keep))
    x2 = torch.randn(2, 5, 8)
    assert torch.allclose(masked(x2, keep), small(x2, keep), atol=1e-6)
    assert n_params(small) == 3 * (8 * 4 + 4) + 4 * 8 + 8


class _HeadsInBatch(nn.Module):
    """DeBERTa's attention: heads merged into the batch axis for bmm, ``(B*H, N, d)``, split off
    again after it, and the scale computed from the head size read at run time."""

    def __init__(self, d=8, heads=4):
        super().__init__()
        self.heads, self.q, self.k, self.v, self.o = heads, *(nn.Linear(d, d) for _ in range(4))

    def _split(self, t):
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).permute(0, 2, 1, 3).contiguous().view(-1, n, t.size(-1) // self.heads)

    def forward(self, x):
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scale = torch.sqrt(torch.tensor(q.size(-1), dtype=torch.float))
        probs = torch.bmm(q, k.transpose(-1, -2) / scale).softmax(-1)
        out = torch.bmm(probs, v)
        out = out.view(-1, self.heads, out.size(-2), out.size(-1)).permute(0, 2, 1, 3).contiguous()
        return self.o(out.view(out.size(0), out.size(1), -1))


def test_heads_merged_into_the_batch_axis_are_pruned_whole():
    x = torch.randn(2, 5, 8)
    gm = surgery.capture(_HeadsInBatch().eval(), (x,))
    heads = [g for g in surgery.channel_groups(gm) if g.size == 4]
    assert len(heads) == 1 and heads[0].frozen is None
    _, small = _prune(_HeadsInBatch(), x)
    assert n_params(small) == 3 * (8 * 4 + 4) + 4 * 8 + 8


class _WrittenSizes(nn.Module):
    """timm's MaxViT/GCViT relative position bias, ``table[index].view(N, N, heads)`` with the head
    count written in, and MetaFormer's ``scale.view(C, 1, 1)``: the parameters lose heads and
    channels, and the lengths written on their way must follow."""

    def __init__(self, c=8, heads=4, n=6):
        super().__init__()
        self.heads, self.n = heads, n
        self.conv, self.scale = nn.Conv2d(3, c, 1), nn.Parameter(torch.rand(c) + 0.5)
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))
        self.table = nn.Parameter(torch.randn(2 * n - 1, heads))
        pos = torch.arange(n)
        self.register_buffer("index", (pos[:, None] - pos[None, :] + n - 1).flatten())
        self.head = nn.Linear(c, 2)

    def forward(self, x):
        h = self.conv(x) * self.scale.view(8, 1, 1)
        h = h.flatten(2).transpose(1, 2)                              # (B, n, C)
        b = h.shape[0]
        q, k, v = (f(h).view(b, self.n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        bias = self.table[self.index].view(self.n, self.n, 4).permute(2, 0, 1)
        y = torch.softmax(q @ k.transpose(-1, -2) + bias, -1) @ v
        return self.head(h + self.o(y.transpose(1, 2).reshape(b, self.n, -1)))


def test_lengths_written_into_views_of_a_parameter_follow_its_cut():
    x = torch.randn(2, 3, 2, 3)
    _, small = _prune(_WrittenSizes(), x)
    assert small.get_parameter("table").shape == (11, 2) and small.get_parameter("scale").shape == (4,)
    c, heads = 4, 2
    assert n_params(small) == 3 * c + c + c + 3 * (c * 2 * heads + 2 * heads) + (2 * heads * c + c) + 11 * heads \
        + c * 2 + 2


class _Clipped(nn.Module):
    """Gemma 4's clippable linear layers: ``torch.clamp(x, self.input_min, self.input_max)`` with
    one-element buffers as bounds, between the layers whose units go."""

    def __init__(self, lo=-3.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 2)
        self.register_buffer("lo", torch.tensor(lo))
        self.register_buffer("hi", torch.tensor(3.0))

    def forward(self, x):
        return self.fc2(torch.clamp(torch.relu(self.fc1(x)), self.lo, self.hi))


def test_a_clamp_with_buffer_bounds_keeps_a_zero_zero():
    x = torch.randn(4, 6)
    _, small = _prune(_Clipped(), x)
    assert n_params(small) == 6 * 4 + 4 + 4 * 2 + 2


class _Disentangled(nn.Module):
    """DeBERTa-v2/v3's disentangled attention in miniature: heads merged into the batch axis; the
    key projection applied to the relative-position table as well, its heads repeated once per
    batch row (``repeat(q.size(0) // heads, 1, 1)``); position scores gathered by buckets
    expanded to ``q.size(0)`` rows; a ``zeros_like`` of the stream."""

    def __init__(self, d=8, heads=4, span=3, n=5, table=True):
        super().__init__()
        self.heads = heads
        self.inp, self.q, self.k, self.v, self.o = nn.Linear(6, d), *(nn.Linear(d, d) for _ in range(4))
        # the table: an Embedding's, as DeBERTa's, or a bare parameter, which no rule tracks as channels
        self.rel = nn.Embedding(2 * span, d) if table else nn.ParameterDict({"weight": torch.randn(2 * span, d)})
        self.head = nn.Linear(d, 2)
        pos = torch.arange(n)
        self.register_buffer("buckets", (pos[:, None] - pos[None, :] + span).clamp(0, 2 * span - 1))

    def split(self, t):
        t = t.view(t.size()[:-1] + (self.heads, -1))
        return t.permute(0, 2, 1, 3).contiguous().view(-1, t.size(1), t.size(-1))

    def forward(self, x):
        h = self.inp(x)
        q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
        pos_k = self.split(self.k(self.rel.weight.unsqueeze(0))).repeat(q.size(0) // self.heads, 1, 1)
        index = self.buckets.unsqueeze(0).expand(q.size(0), q.size(1), q.size(1))
        scores = torch.bmm(q, k.transpose(-1, -2)) + torch.gather(torch.bmm(q, pos_k.transpose(-1, -2)), -1, index)
        y = torch.bmm(torch.softmax(scores, -1), v)
        y = y.view(-1, self.heads, y.size(1), y.size(2)).permute(0, 2, 1, 3).reshape(x.size(0), x.size(1), -1)
        return self.head(h + self.o(y) + torch.zeros_like(h))


def test_disentangled_attention_loses_heads_and_the_stream_with_its_position_table():
    x = torch.randn(2, 5, 6)
    gm = surgery.capture(_Disentangled().eval(), (x,))
    groups = {g.size: g for g in surgery.channel_groups(gm)}
    assert groups[4].frozen is None  # the heads, through repeat, gather and the merged batch axis
    # the stream: the table's columns (read whole, as DeBERTa's rel_embeddings.weight) are its channels too
    assert groups[8].frozen is None and "rel_weight" in [p.node.name for p in groups[8].producers]
    masked, small = _prune(_Disentangled(), x)
    assert small.rel.weight.shape == (6, 4) and small.rel.embedding_dim == 4
    assert n_params(small) == (6 * 4 + 4) + 3 * (4 * 4 + 4) + (4 * 4 + 4) + 6 * 4 + (4 * 2 + 2)
    for b in (1, 3):  # the repeat and the gather read the batch size at run time, as before
        x2 = torch.randn(b, 5, 6)
        assert torch.allclose(masked(x2), small(x2), atol=1e-5)


def test_a_module_also_called_on_an_untracked_table_keeps_its_inputs():
    x = torch.randn(2, 5, 6)
    gm = surgery.capture(_Disentangled(table=False).eval(), (x,))
    groups = {g.size: g for g in surgery.channel_groups(gm)}
    # k also reads a bare parameter, whose columns no rule tracks: cutting k's inputs would break that call
    assert "'k' is also called at node 'k_1', on an input whose channels the rules do not track along axis 1" \
        in str(groups[8].frozen)
    _, small = _prune(_Disentangled(table=False), x)
    assert n_params(small) == (6 * 8 + 8) + 3 * (8 * 4 + 4) + (4 * 8 + 8) + 6 * 8 + (8 * 2 + 2)


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
