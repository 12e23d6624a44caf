"""Shrink: exact, smaller, exported, on hand-built architectures that stress channel groups."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch import nn

import surgery
from passes import Shrink
from surgery.channels import channel_groups
from surgery.errors import ShrinkMismatch
from surgery.pipeline import UnitMask
from surgery.verify import max_rel_diff, run_eval

from helpers import Scale, insert_shared_mask, masked_and_shrunk, n_params, randomise_norms


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b1 = nn.Conv2d(16, 8, 1)
        self.b2 = nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(16, 8, 1))
        self.mix = nn.Sequential(nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x)], dim=1)
        return self.head(self.mix(x).mean((2, 3)))


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
        self.branch2 = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.out = nn.Conv2d(16, 12, 1)
        self.head = nn.Linear(12, 5)

    @staticmethod
    def shuffle(x, groups: int = 2):
        b, c, h, w = x.size()
        return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)

    def forward(self, x):
        x = self.stem(x)
        for br in (self.branch, self.branch2):
            a, b = x.chunk(2, dim=1)
            x = self.shuffle(torch.cat([a, br(b)], dim=1))
        return self.head(torch.relu(self.out(x)).mean((2, 3)))


class DepthwiseSE(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.fc1, self.fc2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.project = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = self.dw(self.expand(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 1)))))
        x = self.project(x * s)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class PreActResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1, self.conv1 = nn.BatchNorm2d(16), nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(32), nn.Conv2d(32, 32, 3, padding=1)
        self.shortcut = nn.Conv2d(16, 32, 1, stride=2)
        self.bn3, self.conv3 = nn.BatchNorm2d(32), nn.Conv2d(32, 32, 3, padding=1)
        self.bn_out = nn.BatchNorm2d(32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stem(x)
        o = torch.relu(self.bn1(x))
        x = self.shortcut(o) + self.conv2(torch.relu(self.bn2(self.conv1(o))))
        x = x + self.conv3(torch.relu(self.bn3(x)))
        return self.head(torch.relu(self.bn_out(x)).mean((2, 3)))


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 8, 32), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(32, 5))

    def forward(self, x):
        return self.classifier(self.features(x))


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 12, 1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.shared(x))
        x = torch.relu(self.shared(x))
        return self.head(torch.relu(self.mid(x)).mean((2, 3)))


class ChunkBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.left, self.right = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.join = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        a, b = torch.chunk(self.stem(x), 2, dim=1)
        x = torch.cat([torch.relu(self.left(a)), torch.relu(self.right(b))], 1)
        return self.head(torch.relu(self.join(x)).mean((2, 3)))


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.enc2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))

    def forward(self, x):
        e1 = self.enc1(x)
        return self.dec(torch.cat([torch.relu(self.up(self.enc2(e1))), e1], dim=1))


class TransformerMLP(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.norm1 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * d, d))
        self.norm2 = nn.LayerNorm(d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.mlp(self.norm1(x))
        return self.head(self.norm2(x).mean(1))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(),
                                 nn.Conv1d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                                 nn.Linear(16, 5))

    def forward(self, x):
        return self.net(x)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow: fx cannot trace this
            return x * 2
        return x - 1


class WithOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.gate = DataDependent()
        self.b = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.b(self.gate(self.a(x))).mean((2, 3)))


IMG = (1, 3, 16, 16)
ARCHS = {
    "inception_cat": (Inception, IMG), "channel_shuffle": (Shuffle, IMG), "depthwise_se": (DepthwiseSE, IMG),
    "preact_projection": (PreActResidual, IMG), "flatten_linear": (FlattenLinear, IMG),
    "module_reused": (Reused, IMG), "chunk_branches": (ChunkBranches, IMG), "unet_convtranspose": (UNet, IMG),
    "transformer_mlp": (TransformerMLP, (2, 7, 6)), "conv1d": (Conv1dNet, (2, 4, 20)),
    "opaque_submodule": (WithOpaque, IMG),
}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_architecture_exact_smaller_exported(name, tmp_path):
    cls, shape = ARCHS[name]
    model = randomise_norms(cls())
    masked, small, x = masked_and_shrunk(model, shape)
    assert any(isinstance(m, UnitMask) for m in masked.modules()), "ChannelPrune placed no mask"
    assert n_params(small) < n_params(model)
    assert not any(type(m).__module__.startswith(("surgery", "passes")) for m in small.modules()
                   if not isinstance(m, fx.GraphModule))
    x2 = torch.randn(*shape) * 2  # fresh inputs: exactness is not a property of the example inputs
    assert max_rel_diff(run_eval(masked, (x2,)), run_eval(small, (x2,))) < 1e-5
    assert max_rel_diff(run_eval(model, (x2,)).shape, run_eval(small, (x2,)).shape) == 0
    path = surgery.export(small, tmp_path / f"{name}.pt", (x2,))
    assert max_rel_diff(torch.jit.load(str(path))(x2), run_eval(small, (x2,))) < 1e-5


def test_report_lists_groups_and_is_printable():
    _, small, _ = masked_and_shrunk(randomise_norms(PreActResidual()), IMG)
    rep = small.report
    assert rep is surgery.shrink_report(small)
    assert rep.params_after < rep.params_before
    assert any(g.after < g.before for g in rep.groups)
    text = str(rep)
    assert "params" in text and "before" in text


def test_exact_counts_on_a_chain():
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 12 * 12, 4))
    _, small, _ = masked_and_shrunk(randomise_norms(net), (1, 3, 16, 16))
    assert small.get_submodule("0").out_channels == 8
    assert small.get_submodule("1").num_features == 8
    assert small.get_submodule("3").in_channels == 8 and small.get_submodule("3").out_channels == 4
    assert small.get_submodule("6").in_features == 4 * 12 * 12 and small.get_submodule("6").out_features == 4


@pytest.mark.parametrize("name", ["preact_projection", "depthwise_se", "inception_cat", "channel_shuffle"])
def test_non_binary_masks_fold_exactly(name):
    cls, shape = ARCHS[name]
    torch.manual_seed(1)
    x = torch.randn(*shape)
    gm = surgery.capture(randomise_norms(cls()), (x,))
    for g in channel_groups(gm):
        if g.mask_points():
            f = torch.rand(g.size) * 2 - 0.5          # some negative factors: not foldable through ReLU
            f[torch.rand(g.size) < 0.4] = 0
            f[0] = 1.0
            insert_shared_mask(gm, g, Scale(f, g.mask_points()[0].dim), f"scale_{g.id}")
    small = surgery.compress(gm, [Shrink()], example_inputs=(x,))
    x2 = torch.randn(*shape)
    assert max_rel_diff(run_eval(gm, (x2,)), run_eval(small, (x2,))) < 1e-5
    assert n_params(small) < n_params(gm)


def test_mask_before_batchnorm_keeps_or_folds_constant_channels():
    """A mask before BN makes a removed channel the BN's constant bias: the Linear reader folds
    it; the zero-padded conv reader cannot, so that channel stays (and the report says why)."""
    net = randomise_norms(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                   nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 3)))
    x = torch.randn(2, 3, 16, 16)
    for pad, expect_removed in ((1, False), (0, True)):
        net[3].padding = (pad, pad)
        net[6] = nn.Linear(8 * (14 - 2 + 2 * pad) ** 2, 3)
        gm = surgery.capture(net, (x,))
        f = torch.ones(8)
        f[:4] = 0
        node = gm.graph.find_nodes(op="call_module", target="0")[0]
        surgery.graph.insert_after(gm, node, Scale(f, 1), "m")
        small = surgery.compress(gm, [Shrink()], example_inputs=(x,))
        assert (small.get_submodule("0").out_channels == 4) == expect_removed
        if not expect_removed:
            assert "cannot fold" in str(small.report)
        x2 = torch.randn(2, 3, 16, 16)
        assert max_rel_diff(run_eval(gm, (x2,)), run_eval(small, (x2,))) < 1e-5


def test_shrink_raises_on_a_wrong_rule():
    """A rule that lies (a channel flip declared channel-local) must end in ShrinkMismatch."""
    class Flip(nn.Module):
        def forward(self, x):
            return x.flip(1)

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), Flip(), nn.Conv2d(8, 4, 3))
    x = torch.randn(1, 3, 12, 12)
    gm = surgery.capture(net, (x,), leaf_modules=[Flip])
    from surgery.channels import passthrough
    with pytest.raises(ShrinkMismatch, match="differs"):
        surgery.channels.RULES[Flip] = passthrough("keep")  # a lie: keep claims values stay put
        try:
            g = [g for g in channel_groups(gm) if g.mask_points()][0]
            f = torch.ones(g.size)
            f[:3] = 0
            insert_shared_mask(gm, g, Scale(f, 1), "m")
            surgery.compress(gm, [Shrink()], example_inputs=(x,))
        finally:
            del surgery.channels.RULES[Flip]


def test_shrink_needs_example_inputs():
    gm = surgery.capture(nn.Sequential(nn.Linear(4, 4)), (torch.randn(1, 4),))
    with pytest.raises(surgery.SurgeryError, match="example_inputs"):
        surgery.compress(gm, [Shrink()])


def test_does_not_mutate_the_masked_model():
    masked, small, x = masked_and_shrunk(randomise_norms(Inception()), IMG)
    assert masked.get_submodule("stem.0").out_channels == 16
    assert any(isinstance(m, UnitMask) for m in masked.modules())
    shared = {p.data_ptr() for p in masked.state_dict().values()} & {p.data_ptr() for p in small.state_dict().values()}
    assert not shared, "the shrunk model must own its tensors"


def test_torchvision_resnet18_exact_and_smaller():
    import torchvision
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    masked, small, x = masked_and_shrunk(randomise_norms(model), (1, 3, 32, 32))
    assert n_params(small) < 0.4 * n_params(model)
    assert max_rel_diff(run_eval(masked, (x,)), run_eval(small, (x,))) < 1e-4


def test_grouped_convolution_keeps_equal_channels_per_group():
    net = randomise_norms(nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 8 * 8, 3)))
    masked, small, x = masked_and_shrunk(net, (1, 3, 8, 8))
    g = small.get_submodule("3")
    assert (small.get_submodule("0").out_channels, g.in_channels, g.out_channels, g.groups) == (8, 8, 8, 4)
    x2 = torch.randn(2, 3, 8, 8)
    assert max_rel_diff(run_eval(masked, (x2,)), run_eval(small, (x2,))) < 1e-5


class MixedStream(nn.Module):
    """NextViT's stream, small: two pieces concatenated (12 channels from the stem, 4 from a
    projection), each read by a grouped convolution of its own (3 and 2 groups), then one MLP
    adding to all 16."""

    def __init__(self):
        super().__init__()
        self.stem, self.dw = nn.Conv2d(3, 12, 1), nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.proj, self.gconv = nn.Conv2d(12, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fc1, self.fc2, self.head = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1), nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.dw(x)
        out = self.proj(x)
        y = torch.cat([x, out + self.gconv(out)], 1)
        y = y + self.fc2(torch.relu(self.fc1(y)))
        return self.head(y).mean((2, 3))


def test_grouped_convolutions_on_pieces_of_a_group_keep_equal_channels_per_group():
    masked, small, _ = masked_and_shrunk(MixedStream().eval(), (2, 3, 8, 8))
    # half of each of the five segments (4, 4, 4 and 2, 2 channels) and of the MLP: stem 3x6+6,
    # dw 6x2x9+6, proj 6x2+2, gconv 2x9+2, fc1 8x4+4, fc2 4x8+8, head 8x5+5
    assert n_params(MixedStream()) == 48 + 444 + 52 + 76 + 136 + 144 + 85
    assert n_params(small) == 24 + 114 + 14 + 20 + 36 + 40 + 45
    assert not [why for row in surgery.shrink_report(small).groups for why in row.kept.values()]
    x2 = torch.randn(3, 3, 8, 8)
    assert max_rel_diff(run_eval(masked, (x2,)), run_eval(small, (x2,))) < 1e-5


class Pieces(nn.Module):
    """Inception-ResNet's stream, small: the stem's channels concatenated with two branches of
    other fan-ins (1x1 from 8, 3x3 from 8), then a residual over all 24."""

    def __init__(self):
        super().__init__()
        self.stem, self.b0, self.b1 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 12, 3, padding=1)
        self.mix, self.head = nn.Conv2d(24, 24, 1), nn.Linear(24, 5)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        y = torch.cat([s, self.b0(s), self.b1(s)], 1)
        y = y + self.mix(torch.relu(y))
        return self.head(y.mean((2, 3)))


def test_each_piece_of_a_concatenated_group_keeps_its_share():
    """The pieces' l1 scores scale with their fan-ins (3, 8, 72): ranked together, the stem's and
    the 1x1 branch's channels would all go first, and Shrink would keep a channel of each."""
    masked, small, _ = masked_and_shrunk(Pieces().eval(), (2, 3, 8, 8))
    # stem 3x4+4, b0 4x2+2, b1 4x6x9+6, mix 12x12+12, head 12x5+5
    assert n_params(Pieces()) == 32 + 36 + 876 + 600 + 125
    assert n_params(small) == 16 + 10 + 222 + 156 + 65
    x2 = torch.randn(3, 3, 8, 8)
    assert max_rel_diff(run_eval(masked, (x2,)), run_eval(small, (x2,))) < 1e-5


def test_soft_mask_folds_into_the_next_layer():
    """Kept non-binary factors after a GELU (not foldable backwards) go into the readers' weights,
    depthwise and Linear alike: no multiplication is left."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GELU(), nn.Conv2d(8, 8, 3, groups=8), nn.GELU(), nn.Flatten(),
                        nn.Linear(8 * 8 * 8, 3))
    x = torch.randn(2, 3, 12, 12)
    gm = surgery.capture(net, (x,))
    f = torch.linspace(-1, 2, 8)
    f[2] = 0
    for target in ("1", "3"):
        node = gm.graph.find_nodes(op="call_module", target=target)[0]
        surgery.graph.insert_after(gm, node, Scale(f.clone(), 1 if target == "1" else -3), f"m{target}")
    small = surgery.compress(gm, [Shrink()], example_inputs=(x,))
    assert not small.report.masks_scaled
    assert not any(n.target is torch.mul for n in small.graph.nodes)
    assert small.get_submodule("2").groups == 7
    x2 = torch.randn(3, 3, 12, 12)
    assert max_rel_diff(run_eval(gm, (x2,)), run_eval(small, (x2,))) < 1e-5


def test_functional_shrink_leaves_its_input_alone():
    masked, _, x = masked_and_shrunk(randomise_norms(Inception()), IMG)
    before = {k: v.clone() for k, v in masked.state_dict().items()}
    small = surgery.shrink(masked, (x,))
    assert all(torch.equal(before[k], v) for k, v in masked.state_dict().items())
    assert any(isinstance(m, UnitMask) for m in masked.modules()) and n_params(small) < n_params(masked)


def test_timm_norm_act_layer_stays_whole_and_shrinks_exactly():
    """timm's BatchNormAct2d with an element-wise act is one node of its own class, pruned by its
    rule; a kept factor after it is not folded into its BatchNorm (the SiLU comes in between).
    With a PReLU it is traced into (F.batch_norm, then the PReLU's own node)."""
    from timm.layers import BatchNormAct2d
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), BatchNormAct2d(16, act_layer=nn.SiLU), nn.Conv2d(16, 8, 3),
                        BatchNormAct2d(8, act_layer=nn.PReLU), nn.Flatten(), nn.Linear(8 * 12 * 12, 4))
    x = torch.randn(2, 3, 16, 16)
    gm = surgery.capture(randomise_norms(net), (x,))
    modules = {n.target for n in gm.graph.find_nodes(op="call_module")}
    norms = [n for n in gm.graph.nodes if n.target is torch.nn.functional.batch_norm]
    assert "1" in modules and "3" not in modules and "3.act" in modules and len(norms) == 1
    for g in channel_groups(gm):
        if g.mask_points():
            f = torch.rand(g.size) + 0.5
            f[::3] = 0
            insert_shared_mask(gm, g, Scale(f, g.mask_points()[0].dim), f"scale_{g.id}")
    small = surgery.compress(gm, [Shrink()], example_inputs=(x,))
    x2 = torch.randn(2, 3, 16, 16)
    assert max_rel_diff(run_eval(gm, (x2,)), run_eval(small, (x2,))) < 1e-5
    assert small.get_submodule("1").num_features == 10 and small.get_submodule("3").num_features == 5
    assert type(small.get_submodule("1")) is BatchNormAct2d
