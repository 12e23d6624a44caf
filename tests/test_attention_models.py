"""Attention in library classes, traced as plain ops and pruned whole: torch's
nn.TransformerEncoder and nn.MultiheadAttention, torchvision's Swin and Swin3d windows. Heads and
streams shrink, and the shrunk model equals the masked one."""
import pytest
import torch
from torch import nn

import surgery
from surgery.verify import max_abs_diff, run_eval

from helpers import pruned_at


@pytest.mark.parametrize("batch_first,norm_first", [(True, True), (False, False)])
def test_torch_transformer_encoders_lose_heads_stream_and_mlp_units_exactly(batch_first, norm_first):
    """nn.TransformerEncoder, its layers and their nn.MultiheadAttention are traced as plain ops
    (their fused fast path is one kernel no rule could see into)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    model = nn.Sequential(nn.Linear(8, 32), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Linear(32, 3)).eval()
    x = torch.randn(2, 5, 8) if batch_first else torch.randn(5, 2, 8)
    gm = surgery.capture(model, (x,))
    assert not any(isinstance(gm.get_submodule(str(n.target)), (nn.MultiheadAttention, nn.TransformerEncoderLayer))
                   for n in gm.graph.nodes if n.op == "call_module")
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    masked, small = pruned_at(model, x)
    x2 = torch.randn_like(x)
    assert max_abs_diff(run_eval(masked, (x2,)), run_eval(small, (x2,))) < 1e-5
    d, inner, mlp = 16, 2 * 8, 32  # half the stream, 2 of 4 heads (of 8 dims), half the MLP
    block = (3 * inner * d + 3 * inner) + (inner * d + d) + 2 * 2 * d + (d * mlp + mlp) + (mlp * d + d)
    assert sum(p.numel() for p in small.parameters()) == (8 * d + d) + 2 * block + (d * 3 + 3)


def test_multihead_attention_asked_for_its_weights_or_given_a_mask_stays_one_call():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.MultiheadAttention(16, 2, batch_first=True), nn.MultiheadAttention(16, 2)

        def forward(self, x, pad):
            y, w = self.a(x, x, x)  # need_weights defaults to True
            z, _ = self.b(y, y, y, key_padding_mask=pad, need_weights=False)
            return z, w

    x, pad = torch.randn(2, 5, 16), torch.zeros(5, 2, dtype=torch.bool)  # b reads (2, 5) as (T, B)
    model = Net().eval()
    gm = surgery.capture(model, (x, pad))
    assert sorted(str(n.target) for n in gm.graph.nodes if n.op == "call_module") == ["a", "b"]
    assert all(torch.equal(u, v) for u, v in zip(gm(x, pad), model(x, pad)))


def test_torchvision_swin_loses_heads_and_stream_channels_exactly():
    """torchvision's ShiftedWindowAttention is traced as plain ops (its wrapped function derives the
    head size from the input width), shifted windows and relative position table included; heads
    and streams shrink."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                               window_size=[4, 4], num_classes=5).eval()
    x = torch.randn(2, 3, 24, 24)  # 12x12 tokens: padded to whole windows, shifted
    gm = surgery.capture(model, (x,))
    assert torch.allclose(gm(x), model(x), atol=1e-5)
    masked, small = pruned_at(model, x)
    x2 = torch.randn(1, 3, 24, 24)
    assert max_abs_diff(run_eval(masked, (x2,)), run_eval(small, (x2,))) < 1e-5
    qkv = [m for n, m in small.named_modules() if n.endswith("attn.qkv")]
    assert [m.out_features for m in qkv] == [3 * 8, 3 * 8, 3 * 16, 3 * 16]  # half the heads of 8 dims
    # the streams too: patch merging joins four copies of each channel, and its norm's mask takes them
    # four times over (a tiled mask)
    assert small.get_submodule("features.0.0").out_channels == 8
    merge = small.get_submodule("features.2.reduction")
    assert (merge.in_features, merge.out_features) == (4 * 8, 16)


def test_torchvision_swin3d_window_attention_loses_heads_and_stream_channels_exactly():
    pytest.importorskip("torchvision")
    from torchvision.models.video.swin_transformer import SwinTransformer3d
    torch.manual_seed(0)
    model = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                              window_size=[2, 4, 4], num_classes=5).eval()
    x = torch.randn(1, 3, 4, 32, 32)  # 2x8x8 tokens: shifted windows
    gm = surgery.capture(model, (x,))
    assert torch.allclose(gm(x), model(x), atol=1e-5)
    masked, small = pruned_at(model, x)
    assert max_abs_diff(run_eval(masked, (x,)), run_eval(small, (x,))) < 1e-5
    qkv = [m for n, m in small.named_modules() if n.endswith("attn.qkv")]
    assert [m.out_features for m in qkv] == [3 * 8, 3 * 8, 3 * 16, 3 * 16]
    assert small.get_submodule("patch_embed.proj").out_channels == 8
