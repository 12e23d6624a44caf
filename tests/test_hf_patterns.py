"""Patterns met in Hugging Face task models and timm models, each in miniature: pruned exactly,
with the parameter count that the kept widths give (see test_streams for the helper's checks)."""
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
