"""Attention by head dimensions (``ChannelPrune(attention="head_dims")``): every head keeps the
same positions of q and k, and of v with the output projection's columns, exactly.

The reference is attention computed by hand from the original weights, sliced to the positions
the masks kept, with the original softmax scale (which SDPA would otherwise derive from the
narrower heads)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from passes import ChannelPrune, Shrink
from surgery.channels import channel_groups, set_analysis
from surgery.verify import max_abs_diff, run_eval
from test_attention import Attention


def _prune(model, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = surgery.compress(model.eval(), [ChannelPrune(0.5, attention="head_dims", **kw)], (x,))
        small = surgery.compress(masked, [Shrink()], (x,))
    return masked, small


def _kept(masked, producer):
    """The positions (of one head) kept by the mask applied to `producer`'s output, or all."""
    for n in masked.graph.nodes:
        if n.op == "call_module" and n.target.startswith("prune_") and n.args[0].name == producer:
            return torch.nonzero(masked.get_submodule(n.target).kept()).flatten()
    return None


def _reference(model: Attention, x, qk: torch.Tensor, v_pos: torch.Tensor):
    """`model`'s attention on `x` with only positions `qk` of q and k and `v_pos` of v in every
    head, computed from its sliced weights; the scale stays 1/sqrt(original head size)."""
    B, T, _ = x.shape
    hd, rep = model.hd, model.h // model.kv

    def proj(lin, heads, pos):
        rows = (torch.arange(heads)[:, None] * hd + pos).flatten()
        return F.linear(x, lin.weight[rows], lin.bias[rows]).view(B, T, heads, len(pos)).transpose(1, 2)
    q, k, v = proj(model.q, model.h, qk), proj(model.k, model.kv, qk), proj(model.v, model.kv, v_pos)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    y = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), -1) @ v
    cols = (torch.arange(model.h)[:, None] * hd + v_pos).flatten()
    return F.linear(y.transpose(1, 2).reshape(B, T, -1), model.o.weight[:, cols], model.o.bias)


CASES = {
    "eager": dict(mode="eager"),
    "sdpa": dict(mode="sdpa"),  # SDPA's default scale: Shrink passes the original one
    "gqa_8_2_repeat_kv": dict(kv_heads=2, mode="eager"),
    "gqa_8_2_sdpa": dict(kv_heads=2, mode="sdpa_gqa"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_head_dimensions_leave_exactly_as_a_hand_built_reference_says(case):
    torch.manual_seed(0)
    model = Attention(head_dim=6, **CASES[case]).eval()
    x = torch.randn(2, 7, 24)
    masked, small = _prune(model, x)
    qk, v_pos = _kept(masked, "q"), _kept(masked, "v")
    assert torch.equal(qk, _kept(masked, "k")) and len(qk) == len(v_pos) == 3
    x2 = torch.randn(3, 7, 24)
    with torch.no_grad():
        want = _reference(model, x2, qk, v_pos)
    assert max_abs_diff(run_eval(masked, (x2,)), want) < 1e-5
    assert max_abs_diff(run_eval(small, (x2,)), want) < 1e-5
    kv = model.kv
    assert small.get_submodule("q").weight.shape == (8 * 3, 24)
    assert small.get_submodule("k").weight.shape == small.get_submodule("v").weight.shape == (kv * 3, 24)
    assert small.get_submodule("o").weight.shape == (24, 8 * 3)
    if case == "sdpa":
        (sdpa,) = [n for n in small.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
        assert sdpa.kwargs["scale"] == pytest.approx(6 ** -0.5)


def test_rotary_embeddings_keep_q_and_k_whole_and_v_still_narrows():
    torch.manual_seed(0)
    model = Attention(kv_heads=4, mode="sdpa", rotary=True).eval()
    x = torch.randn(2, 7, 24)
    gm = surgery.capture(model, (x,))
    set_analysis(gm, "head_dims")
    qk = [g for g in channel_groups(gm) if any(p.node.name == "q" for p in g.producers)]
    assert len(qk) == 1 and "along axis 3" in qk[0].frozen
    masked, small = _prune(model, x)
    assert _kept(masked, "q") is None
    x2 = torch.randn(3, 7, 24)
    assert max_abs_diff(run_eval(masked, (x2,)), run_eval(small, (x2,))) < 1e-5
    assert small.get_submodule("q").weight.shape == (32, 24) and small.get_submodule("v").weight.shape == (8, 24)
    assert small.get_submodule("o").weight.shape == (24, 16)


class _PreNormBlock(nn.Module):
    """A pre-norm transformer block with a classifier: stream, head dimensions and MLP all prunable."""

    def __init__(self, d=24, heads=4, hd=6, norm=nn.LayerNorm):
        super().__init__()
        self.inp, self.n1, self.n2 = nn.Linear(10, d), norm(d), norm(d)
        self.attn = Attention(d, heads, head_dim=hd, mode="sdpa")
        self.fc1, self.fc2, self.head = nn.Linear(d, 48), nn.Linear(48, d), nn.Linear(d, 5)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.attn(self.n1(x))
        x = x + self.fc2(F.gelu(self.fc1(self.n2(x))))
        return self.head(x[:, 0])


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_a_pre_norm_block_loses_stream_head_dims_and_mlp_units_together(norm):
    torch.manual_seed(0)
    model = _PreNormBlock(norm=norm).eval()
    x = torch.randn(2, 5, 10)
    masked, small = _prune(model, x)
    x2 = torch.randn(3, 5, 10)
    assert max_abs_diff(run_eval(masked, (x2,)), run_eval(small, (x2,))) < 1e-5
    d, qk, v, mlp = 12, 4 * 3, 4 * 3, 24
    norms = 2 * d * (2 if norm is nn.LayerNorm else 1)
    want = 10 * d + d + norms + 2 * (qk * d + qk) + (v * d + v) + (d * v + d) + (mlp * d + mlp) + (d * mlp + d) + 5 * d + 5
    assert sum(p.numel() for p in small.parameters()) == want
    with pytest.raises(surgery.ConfigError, match="attention"):
        ChannelPrune(0.5, attention="dims")


def test_trained_masks_reach_head_dimensions_too():
    """GumbelMask(attention="head_dims") puts one gate on q/k positions and one on v positions
    per attention; units a gate turns off leave exactly, as ChannelPrune's do."""
    from passes import GumbelMask
    torch.manual_seed(0)
    model = Attention(kv_heads=2, mode="sdpa", head_dim=6).eval()
    x = torch.randn(2, 7, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gated = surgery.compress(model, [GumbelMask(attention="head_dims")], (x,))
    gates = {n.args[0].name: gated.get_submodule(n.target) for n in gated.graph.nodes
             if n.op == "call_module" and n.target.startswith("gumbel_")}
    assert sorted(gates) == ["k", "q", "v"] and gates["q"] is gates["k"] and len(gates["v"].logits) == 6
    with torch.no_grad():
        gates["q"].logits[[0, 2]] = -10.0
        gates["v"].logits[[1, 3, 5]] = -10.0
    gated.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = surgery.compress(gated, [Shrink()], (x,))
    x2 = torch.randn(3, 7, 24)
    want = _reference(model, x2, torch.tensor([1, 3, 4, 5]), torch.tensor([0, 2, 4]))
    assert max_abs_diff(run_eval(small, (x2,)), want) < 1e-5
    assert small.get_submodule("q").weight.shape == (8 * 4, 24)
    assert small.get_submodule("v").weight.shape == (2 * 3, 24)
