"""Attention heads: whole heads leave q, k, v and the output projection together, exactly.

Each attention here is pruned by ChannelPrune and shrunk, and the shrunk model is compared with
a hand-built reference: the same attention built with only the kept heads, its weights sliced by
hand. Both must equal the masked model on fresh inputs."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from passes import ChannelPrune, Shrink
from surgery.channels import channel_groups
from surgery.pipeline import UnitMask
from surgery.verify import max_abs_diff, run_eval

from helpers import pruned_at


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Multi-head attention in the forms models use: separate or fused (timm) projections (with
    biases joined by torch.cat for F.linear, as BEiT's),
    grouped-query attention by repeated kv heads (HF's repeat_kv) or SDPA's enable_gqa, eager
    softmax(q k^T) v or SDPA, rotary embeddings, a per-head RMSNorm on q and k (Qwen3), and a
    learned per-head bias on the scores: a tensor, or gathered from a relative position table
    (Swin, BEiT)."""

    def __init__(self, d=24, heads=8, kv_heads=None, head_dim=4, fused=False, mode="sdpa", rotary=False,
                 qk_norm=False, bias_len=0, table=False, cat_bias=False):
        super().__init__()
        self.h, self.kv, self.hd, self.fused, self.mode = heads, kv_heads or heads, head_dim, fused, mode
        self.rotary, self.qk_norm, self.cat_bias = rotary, qk_norm, cat_bias
        if fused:
            self.qkv = nn.Linear(d, 3 * heads * head_dim, bias=not cat_bias)
            if cat_bias:  # BEiT: q and v biases learned, k's a zero buffer, joined for one F.linear
                self.q_bias, self.v_bias = (nn.Parameter(torch.randn(heads * head_dim)) for _ in "qv")
                self.register_buffer("k_bias", torch.zeros(heads * head_dim))
        else:
            self.q, self.k = nn.Linear(d, heads * head_dim), nn.Linear(d, self.kv * head_dim)
            self.v = nn.Linear(d, self.kv * head_dim)
        self.o = nn.Linear(heads * head_dim, d)
        if qk_norm:
            self.q_norm, self.k_norm = nn.RMSNorm(head_dim), nn.RMSNorm(head_dim)
            with torch.no_grad():
                self.q_norm.weight.normal_(1, 0.2)
                self.k_norm.weight.normal_(1, 0.2)
        self.bias = nn.Parameter(torch.randn(heads, bias_len, bias_len) * 0.3) if bias_len and not table else None
        self.table = nn.Parameter(torch.randn(2 * bias_len - 1, heads) * 0.3) if table else None
        if table:  # a relative position bias: a table of (offset, head), gathered per (query, key) pair
            pos = torch.arange(bias_len)
            self.register_buffer("index", pos[:, None] - pos[None, :] + bias_len - 1)

    def forward(self, x):
        B, T, _ = x.shape
        if self.fused:
            qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias))) if self.cat_bias \
                else self.qkv(x)
            q, k, v = qkv.reshape(B, T, 3, self.h, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q(x).view(B, T, -1, self.hd).transpose(1, 2)
            k = self.k(x).view(B, T, -1, self.hd).transpose(1, 2)
            v = self.v(x).view(B, T, -1, self.hd).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            pos = torch.arange(T, dtype=x.dtype)[:, None] / 10 ** (torch.arange(self.hd // 2, dtype=x.dtype) / 2)
            cos, sin = torch.cat([pos.cos()] * 2, -1), torch.cat([pos.sin()] * 2, -1)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        bias = self.bias
        if self.table is not None:
            bias = self.table[self.index.view(-1)].view(T, T, -1).permute(2, 0, 1).contiguous()
        if self.mode == "sdpa_gqa":
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            rep = self.h // self.kv
            if rep > 1:  # Hugging Face's repeat_kv
                b, hkv, s, hd = k.shape
                k = k[:, :, None].expand(b, hkv, rep, s, hd).reshape(b, hkv * rep, s, hd)
                v = v[:, :, None].expand(b, hkv, rep, s, hd).reshape(b, hkv * rep, s, hd)
            if self.mode == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            elif self.mode == "einsum":  # as MaxViT writes it
                scores = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.hd ** -0.5
                y = torch.einsum("b h i j, b h j d -> b h i d", torch.softmax(scores, -1), v)
            else:
                scores = q @ k.transpose(-2, -1) / math.sqrt(self.hd)
                if bias is not None:
                    scores = scores + bias
                y = torch.softmax(scores, -1) @ v
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


def _kept_heads(masked, n):
    (mask,) = [m for m in masked.modules() if isinstance(m, UnitMask) and len(m.kept()) == n]
    return torch.nonzero(mask.kept()).flatten()


def _reference(model: Attention, kv_kept: torch.Tensor) -> Attention:
    """`model` with only the kv heads `kv_kept` (and the query heads they serve), by hand."""
    rep, hd = model.h // model.kv, model.hd
    q_kept = (kv_kept[:, None] * rep + torch.arange(rep)).flatten()
    rows = lambda heads: (heads[:, None] * hd + torch.arange(hd)).flatten()  # noqa: E731
    d = model.o.out_features
    n = 0 if model.bias is None and model.table is None else \
        (model.bias.shape[-1] if model.bias is not None else model.index.shape[0])
    ref = Attention(d, len(q_kept), len(kv_kept), hd, model.fused, model.mode, model.rotary, model.qk_norm, n,
                    model.table is not None, model.cat_bias)
    with torch.no_grad():
        if model.fused:
            w = model.qkv.weight.view(3, model.h * hd, d)[:, rows(q_kept)]
            ref.qkv.weight.copy_(w.reshape(-1, d))
            if model.cat_bias:
                ref.q_bias.copy_(model.q_bias[rows(q_kept)])
                ref.v_bias.copy_(model.v_bias[rows(q_kept)])
            else:
                ref.qkv.bias.copy_(model.qkv.bias.view(3, -1)[:, rows(q_kept)].reshape(-1))
        else:
            for name, r in (("q", rows(q_kept)), ("k", rows(kv_kept)), ("v", rows(kv_kept))):
                getattr(ref, name).weight.copy_(getattr(model, name).weight[r])
                getattr(ref, name).bias.copy_(getattr(model, name).bias[r])
        ref.o.weight.copy_(model.o.weight[:, rows(q_kept)])
        ref.o.bias.copy_(model.o.bias)
        if model.qk_norm:
            ref.q_norm.load_state_dict(model.q_norm.state_dict())
            ref.k_norm.load_state_dict(model.k_norm.state_dict())
        if model.bias is not None:
            ref.bias.copy_(model.bias[q_kept])
        if model.table is not None:
            ref.table.copy_(model.table[:, q_kept])
    return ref.eval()


def _prune(model, x):
    return pruned_at(model.eval(), x)


CASES = {
    "eager": dict(mode="eager"),
    "sdpa": dict(mode="sdpa"),
    "einsum": dict(mode="einsum"),
    "fused_qkv": dict(fused=True, mode="eager"),
    "fused_qkv_sdpa": dict(fused=True, mode="sdpa"),
    "fused_qkv_joined_biases": dict(fused=True, mode="sdpa", cat_bias=True),
    "gqa_8_2_repeat_kv": dict(kv_heads=2, mode="eager"),
    "gqa_8_2_sdpa": dict(kv_heads=2, mode="sdpa_gqa"),
    "rotary_gqa": dict(kv_heads=4, mode="sdpa", rotary=True),
    "qk_norm_rotary": dict(mode="eager", rotary=True, qk_norm=True),
    "head_bias": dict(mode="eager", bias_len=7),
    "head_bias_sdpa": dict(mode="sdpa", bias_len=7),
    "relative_position_table": dict(mode="eager", bias_len=7, table=True),
    "relative_position_table_sdpa": dict(mode="sdpa", bias_len=7, table=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_whole_heads_leave_exactly_as_a_hand_built_reference_says(case):
    torch.manual_seed(0)
    model = Attention(**CASES[case]).eval()
    x = torch.randn(2, 7, 24)
    (group,) = [g for g in channel_groups(surgery.capture(model, (x,))) if g.size == model.kv]
    assert group.frozen is None and group.mask_points()
    masked, small = _prune(model, x)
    kv_kept = _kept_heads(masked, model.kv)
    assert len(kv_kept) == model.kv // 2
    ref = _reference(model, kv_kept)
    x2 = torch.randn(3, 7, 24)
    want = ref(x2)
    assert max_abs_diff(run_eval(masked, (x2,)), want) < 1e-5
    assert max_abs_diff(run_eval(small, (x2,)), want) < 1e-5
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in ref.parameters())


def test_a_head_mask_zeroes_whole_heads_of_the_attention_output():
    """The mask of a head group sits on the heads axis of attention's output, or of v before it is
    repeated for its query heads: never on a projection's output, where a zero would not remove
    the head from the scores."""
    model = Attention(kv_heads=2, mode="eager")
    x = torch.randn(2, 7, 24)
    (group,) = [g for g in channel_groups(surgery.capture(model, (x,))) if g.size == 2]
    (node, dim, *_), = group.mask_points()  # one mask: on v's 2 heads, before they are repeated for 8
    assert node.meta["shape"][dim] == 2 and all(s != 8 for s in node.meta["shape"])


def test_a_per_head_tensor_no_rule_follows_freezes_the_heads_with_the_culprit_named():
    class Noisy(Attention):
        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = (getattr(self, n)(x).view(B, T, -1, self.hd).transpose(1, 2) for n in "qkv")
            scores = q @ k.transpose(-2, -1)
            heads = torch.arange(scores.shape[1], dtype=x.dtype).view(1, -1, 1, 1)  # made at run time
            return self.o((torch.softmax(scores * heads, -1) @ v).transpose(1, 2).reshape(B, T, -1))

    gm = surgery.capture(Noisy().eval(), (torch.randn(2, 7, 24),))
    (group,) = [g for g in channel_groups(gm) if g.size == 8]
    assert group.frozen is not None and "whose channels are not tracked" in group.frozen


class Block(nn.Module):
    """A pre-norm transformer block: multi-head attention (GQA, rotary) and a SwiGLU MLP."""

    def __init__(self, d, norm):
        super().__init__()
        self.n1, self.n2 = norm(d), norm(d)
        self.attn = Attention(d, heads=4, kv_heads=2, head_dim=6, mode="sdpa", rotary=True)
        self.gate, self.up, self.down = nn.Linear(d, 32), nn.Linear(d, 32), nn.Linear(32, d)

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LM(nn.Module):
    def __init__(self, norm, d=24, vocab=13):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(Block(d, norm), Block(d, norm))
        self.norm, self.head = norm(d), nn.Linear(d, 5)

    def forward(self, ids):
        return self.head(self.norm(self.blocks(self.embed(ids))))


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_a_pre_norm_transformer_loses_stream_heads_and_mlp_units_exactly(norm):
    torch.manual_seed(0)
    model = LM(norm).eval()
    ids = torch.randint(0, 13, (2, 9))
    masked, small = _prune(model, ids)
    ids2 = torch.randint(0, 13, (3, 5))  # another batch and length
    assert max_abs_diff(run_eval(masked, (ids2,)), run_eval(small, (ids2,))) < 1e-5
    d, kv, q, hd, mlp = 12, 1, 2, 6, 16  # half the stream, one kv head of two (its 2 query heads), half the MLP
    nb = 2 if norm is nn.LayerNorm else 1
    attn = (d * q * hd + q * hd) + 2 * (d * kv * hd + kv * hd) + (q * hd * d + d)
    block = 2 * nb * d + attn + 2 * (d * mlp + mlp) + (mlp * d + d)
    assert sum(p.numel() for p in small.parameters()) == 13 * d + 2 * block + nb * d + d * 5 + 5


class ChannelAttention(nn.Module):
    """DaViT's channel attention: each head attends over its own dimensions (k^T v), then mixes q."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.h, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.softmax((k * N ** -0.5).transpose(-1, -2) @ v, dim=-1)
        y = (attn @ q.transpose(-1, -2)).transpose(-1, -2)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


def test_channel_attention_loses_whole_heads_and_its_mask_skips_the_softmax():
    torch.manual_seed(0)
    model, x = ChannelAttention().eval(), torch.randn(2, 5, 16)
    masked, small = _prune(model, x)
    x2 = torch.randn(3, 5, 16)
    assert max_abs_diff(run_eval(masked, (x2,)), run_eval(small, (x2,))) < 1e-5
    assert (small.qkv.out_features, small.proj.in_features) == (3 * 8, 8)  # 2 of 4 heads (the C // h is rewritten)


def test_a_mask_on_the_one_kv_head_of_grouped_query_attention_is_read_per_copy():
    """One kv head serving two query heads: its group has one unit, and the mask over it is
    called with tile=2 on the repeated heads. Shrink reads its factor once per copy (an
    IndexError before), keeps the last head, and stays exact."""
    from helpers import Scale, insert_shared_mask
    torch.manual_seed(0)
    model = Attention(heads=2, kv_heads=1, mode="eager").eval()
    x = torch.randn(2, 7, 24)
    gm = surgery.capture(model, (x,))
    (group,) = [g for g in channel_groups(gm) if g.size == 1 and g.frozen is None]
    insert_shared_mask(gm, group, Scale(torch.tensor([0.5]), group.mask_points()[0].dim), "hm")
    small = surgery.compress(gm, [Shrink()], example_inputs=(x,))
    x2 = torch.randn(3, 7, 24)
    assert max_abs_diff(run_eval(gm, (x2,)), run_eval(small, (x2,))) < 1e-5


class _InterleavedRotary(Attention):
    """EVA's rotary embedding: a head's dimensions in pairs (0, 1), (2, 3)... through strided
    slices, ``torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)``."""

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (getattr(self, n)(x).view(B, T, -1, self.hd).transpose(1, 2) for n in "qkv")
        angle = torch.arange(T, dtype=x.dtype)[:, None] * torch.arange(1, self.hd + 1, dtype=x.dtype)
        cos, sin = angle.cos(), angle.sin()

        def rot(t):
            return torch.stack([-t[..., 1::2], t[..., ::2]], -1).reshape(t.shape)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


def test_strided_slices_inside_the_heads_keep_their_step():
    torch.manual_seed(0)
    model = _InterleavedRotary().eval()
    x = torch.randn(2, 7, 24)
    masked, small = _prune(model, x)
    x2 = torch.randn(3, 7, 24)
    assert max_abs_diff(run_eval(masked, (x2,)), run_eval(small, (x2,))) < 1e-5
    # the heads stay whole here (the rules do not follow a stack of strided slices per head): what
    # this checks is that the slices keep their step where their axis loses nothing (EVA failed)
    assert small.get_submodule("q").weight.shape == (32, 24)


def test_a_strided_slice_of_an_axis_that_loses_positions():
    from surgery.errors import SurgeryError
    from surgery.shrink.cut import slice_of_kept as _slice_of_kept
    from types import SimpleNamespace
    kept = np.array([1, 0, 1, 1, 1, 0, 1, 1], dtype=bool)  # positions 0, 2, 3, 4, 6, 7 become 0..5
    node = SimpleNamespace(name="getitem_3")
    assert _slice_of_kept(slice(2, 5), kept, node) == slice(1, 4)             # 2, 3, 4
    assert _slice_of_kept(slice(1, None, 2), kept, node) == slice(2, 6, 3)    # 3, 7 -> 2, 5
    assert _slice_of_kept(slice(None, None, 4), kept, node) == slice(0, 4, 3)  # 0, 4 -> 0, 3
    with pytest.raises(SurgeryError, match="getitem_3.*not evenly spaced"):
        _slice_of_kept(slice(None, None, 2), kept, node)                      # 0, 2, 4, 6 -> 0, 1, 3, 4


class _AdditiveAttention(nn.Module):
    """SwiftFormer's efficient additive attention: the normalised query times a parameter vector
    (``query @ self.w_g``) weighs the tokens."""

    def __init__(self, d=8):
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.w_g = nn.Parameter(torch.randn(d, 1))
        self.proj, self.final = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        query = F.normalize(self.q(x), dim=-1)
        key = F.normalize(self.k(x), dim=-1)
        a = F.normalize(query @ self.w_g * 0.5, dim=1)
        g = torch.sum(a * query, dim=1).unsqueeze(1)
        return self.final(self.proj(g * key) + query)


def test_channels_contracted_with_a_parameter_cut_its_rows_too():
    torch.manual_seed(0)
    net, x = _AdditiveAttention().eval(), torch.randn(2, 5, 8)
    masked = surgery.compress(net, [ChannelPrune(ratio=0.5)], (x,))
    small = surgery.compress(masked, [Shrink()], (x,))
    assert small.get_parameter("w_g").shape == (4, 1) and small.get_parameter("q.weight").shape == (4, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=0, atol=1e-6)


class ScaleNormAttention(nn.Module):
    """BEiT-3's attention (timm's ``scale_norm``): a LayerNorm over the merged heads before the
    output projection, which gives a masked head's channels its bias again."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.h = heads
        self.qkv, self.norm, self.proj = nn.Linear(d, 3 * d), nn.LayerNorm(d), nn.Linear(d, d)
        self.head = nn.Linear(d, 3)
        with torch.no_grad():
            self.norm.weight.normal_(1, 0.2)
            self.norm.bias.normal_(0, 0.2)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.head(self.proj(self.norm(x))).mean(1)


def test_a_norm_over_the_merged_heads_takes_a_mask_too_and_the_heads_leave():
    torch.manual_seed(0)
    model = ScaleNormAttention().eval()
    masked, small = _prune(model, torch.randn(2, 5, 16))
    # two heads of four: qkv 16x24+24, the norm's 8 kept pairs, proj 8x8+8, head 8x3+3
    assert sum(p.numel() for p in model.parameters()) == 816 + 32 + 272 + 51
    assert sum(p.numel() for p in small.parameters()) == 408 + 16 + 72 + 27
    x2 = torch.randn(3, 5, 16)
    assert max_abs_diff(run_eval(masked, (x2,)), run_eval(small, (x2,))) < 1e-5
