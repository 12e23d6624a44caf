"""Position tables and norms of the vision encoders of VLMs (timm's Gemma-4, Qwen3, DeepSeek and
NaFlex ViTs) no longer keep the residual stream whole: each is pruned at ratio 0.5, its stream
too, and shrunk exactly. The rules on hand-built layers first, each against a hand count."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from passes import ChannelPrune, Shrink

from helpers import n_params


def _prune(model: nn.Module, x: torch.Tensor):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = surgery.compress(model.eval(), [ChannelPrune(0.5)], example_inputs=(x,))
        small = surgery.compress(masked, [Shrink()], example_inputs=(x,))
    x2 = torch.randn_like(x)
    with torch.no_grad():
        assert torch.allclose(small(x2), masked(x2), atol=1e-5, rtol=1e-4)
    return small


class CastNorm(nn.Module):
    """DeepSeek's RMSNorm: ``F.rms_norm(x.float(), (D,), self.weight.float())``, on a stream."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.inp, self.weight, self.out = nn.Linear(6, d), nn.Parameter(torch.rand(d) + 0.5), nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(F.rms_norm(h.float(), (h.shape[-1],), weight=self.weight.float(), eps=1e-6) + h)


def test_a_norm_weight_cast_on_the_way_is_cut_with_the_stream():
    small = _prune(CastNorm(), torch.randn(2, 5, 6))
    # 6*8 + 8 | the norm's 8 | 8*3 + 3: the stream keeps 8 of 16
    assert n_params(small) == 56 + 8 + 27


class OneHotTable(nn.Module):
    """Gemma-4's position embedding: ``one_hot(pos).to(table) @ table`` over two tables (x and y),
    summed, added to the tokens."""

    def __init__(self, d: int = 16, size: int = 4):
        super().__init__()
        self.proj, self.head = nn.Linear(6, d), nn.Linear(d, 3)
        self.table = nn.Parameter(torch.randn(2, size, d))

    def forward(self, x, pos):
        one_hot = F.one_hot(pos, self.table.shape[1]).permute(0, 2, 1, 3).to(self.table)
        return self.head(self.proj(x) + (one_hot @ self.table).sum(dim=1))


def test_a_table_read_through_one_hot_rows_is_cut_along_its_channels():
    torch.manual_seed(0)
    x, pos = torch.randn(2, 5, 6), torch.randint(0, 4, (2, 5, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = surgery.compress(OneHotTable().eval(), [ChannelPrune(0.5)], example_inputs=(x, pos))
        small = surgery.compress(masked, [Shrink()], example_inputs=(x, pos))
    x2, pos2 = torch.randn(2, 5, 6), torch.randint(0, 4, (2, 5, 2))
    assert torch.allclose(small(x2, pos2), masked(x2, pos2), atol=1e-5)
    assert small.table.shape == (2, 4, 8)
    assert n_params(small) == 6 * 8 + 8 + 2 * 4 * 8 + 8 * 3 + 3


def test_gemma4_and_qwen3_vit_encoders_lose_their_stream():
    pytest.importorskip("timm")
    from timm.models import gemma4_vit, qwen3_vit
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    gemma = gemma4_vit.Gemma4VitClassifier(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=1,
                                           num_heads=2, head_dim=16, intermediate_size=64, position_embedding_size=8)
    small = _prune(gemma, x)
    assert small.encoder.patch_embed.position_embedding_table.shape == (2, 8, 16)
    # Qwen3's table is resampled from its 6x6 grid to the image's 4x4 (resample_pos_embed_grid)
    qwen = qwen3_vit.Qwen3VitClassifier(img_size=32, patch_size=8, num_classes=5, embed_dim=32, depth=1, num_heads=2,
                                        pos_embed_grid_size=6)
    small = _prune(qwen, x)
    assert small.encoder.pos_embed.shape == (1, 36, 16)


def test_naflexvit_pools_its_tokens_and_reads_its_grid_size():
    """global_pool_naflex pools each channel over the tokens; ``pos_embed.shape[1:3]`` reads the
    grid, not the channels."""
    pytest.importorskip("timm")
    from timm.models import naflexvit
    torch.manual_seed(0)
    cfg = naflexvit.NaFlexVitCfg(patch_size=8, embed_dim=32, depth=1, num_heads=2, pos_embed_grid_size=(6, 6),
                                 global_pool="avg", reg_tokens=2)  # as naflexvit_base_patch16_gap (4 there)
    small = _prune(naflexvit.NaFlexVit(cfg, num_classes=5, img_size=32), torch.randn(2, 3, 32, 32))
    assert small.embeds.pos_embed.shape == (1, 6, 6, 16)


def test_a_depthwise_conv_traced_into_reads_its_kernel_size_and_loses_channels():
    """timm's Conv2dSame, traced into: ``pad_same(x, weight.shape[-2:], ...)`` reads the kernel's
    size, not its channels; the call's ``groups`` follows the module's once Shrink cuts it."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), timm.layers.Conv2dSame(16, 16, 3, stride=2, groups=16),
                        nn.ReLU(), nn.Conv2d(16, 4, 1))
    small = _prune(net, torch.randn(2, 3, 13, 13))
    calls = [n for n in small.graph.nodes if n.target is F.conv2d]
    assert [n.args[6] if len(n.args) > 6 else n.kwargs["groups"] for n in calls] == [8]
    assert n_params(small) == (3 * 8 * 9 + 8) + (8 * 9 + 8) + (8 * 4 + 4)


def test_a_zero_channel_padded_with_minus_infinity_for_a_max_pool_stays_zero():
    """timm's MaxPool2dSame pads with -inf, then max-pools windows longer than the padding: a
    masked channel is zero after it, so the layer reading it may lose it (it kept a zero scale)."""
    pytest.importorskip("timm")
    from timm.layers import pool2d_same
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16), nn.ReLU(), pool2d_same.MaxPool2dSame(3, stride=2),
                        nn.Conv2d(16, 4, 1))
    small = _prune(net, torch.randn(2, 3, 14, 14))
    assert surgery.shrink_report(small).masks_scaled == []
    assert n_params(small) == (3 * 8 * 9 + 8) + 2 * 8 + (8 * 4 + 4)
