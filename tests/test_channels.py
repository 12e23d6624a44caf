"""Channel groups: coupling, index maps, frozen reasons, mask points, custom rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx as fx
from torch import nn

import surgery
from surgery.channels import RULES, channel_groups, channel_local, group_of, register_rule
from surgery.errors import SurgeryError


def _groups(model, *shape, **kw):
    gm = surgery.capture(model, (torch.randn(*shape),), **kw)
    return gm, channel_groups(gm)


def _by_producer(groups, name):
    return [g for g in groups if any(p.node.name == name for p in g.producers)]


def test_residual_stream_is_one_group():
    import torchvision
    gm, gs = _groups(torchvision.models.resnet18(weights=None), 1, 3, 32, 32)
    stream = _by_producer(gs, "conv1")[0]
    names = {p.node.name for p in stream.producers}
    assert names == {"conv1", "layer1_0_conv2", "layer1_1_conv2"}
    assert stream.size == 64 and stream.frozen is None
    assert [p.node.name for p in stream.mask_points()] == ["relu", "layer1_0_bn2", "layer1_1_bn2"]
    assert all(p.dim == -3 for p in stream.mask_points())
    # the final Linear's channels are the model's output: frozen, named
    fc = _by_producer(gs, "fc")[0]
    assert "model output" in fc.frozen


def test_cat_index_map_and_readers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 2, 1)

        def forward(self, x):
            return self.c(torch.cat([self.a(x), self.b(x)], 1))

    gm, gs = _groups(Net(), 1, 3, 8, 8)
    ga, gb = _by_producer(gs, "a")[0], _by_producer(gs, "b")[0]
    reader_a = [p for p in ga.readers if p.node.name == "c"][0]
    np.testing.assert_array_equal(reader_a.channels, [0, 1, 2, 3] + [-1] * 6)
    reader_b = [p for p in gb.readers if p.node.name == "c"][0]
    np.testing.assert_array_equal(reader_b.channels, [-1] * 4 + list(range(6)))
    assert group_of(gs, gm.graph.find_nodes(op="call_module", target="c")[0]) == [ga, gb, _by_producer(gs, "c")[0]]


def test_flatten_expands_channels_into_features():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    _, gs = _groups(net, 1, 3, 8, 8)
    g = _by_producer(gs, "_0")[0]
    lin = [p for p in g.readers if p.node.name == "_2"][0]
    np.testing.assert_array_equal(lin.channels, np.repeat(np.arange(4), 36))


def test_squeeze_excite_gate_couples_branches():
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc1, self.fc2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
            self.out = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            x = self.conv(x)
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
            return self.out(x * s)

    _, gs = _groups(SE(), 1, 3, 8, 8)
    g = _by_producer(gs, "conv")[0]
    assert {p.node.name for p in g.producers} == {"conv", "fc2"}
    assert {p.node.name for p in g.mask_points()} == {"conv", "sigmoid"}


def test_depthwise_ties_input_to_output_and_grouped_conv_reads():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1, groups=2))
    _, gs = _groups(net, 1, 3, 8, 8)
    g = _by_producer(gs, "_0")[0]
    assert [p.node.name for p in g.locals] == ["_1"]
    assert [p.node.name for p in g.readers] == ["_2"]


def test_layernorm_over_two_axes_and_unknown_ops_freeze_with_the_culprit_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.norm, self.b = nn.Linear(4, 8), nn.LayerNorm((2, 8)), nn.Linear(8, 8)
            self.c = nn.Linear(8, 3)

        def forward(self, x):
            return self.c(torch.cumsum(self.b(self.norm(self.a(x))), -1))

    _, gs = _groups(Net(), 3, 2, 4)
    assert "LayerNorm 'norm' counts these channels" in _by_producer(gs, "a")[0].frozen
    assert "cumsum" in _by_producer(gs, "b")[0].frozen and "no channel rule" in _by_producer(gs, "b")[0].frozen
    assert _by_producer(gs, "a")[0].mask_points() == []


def test_channel_shuffle_and_chunk_are_followed():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            n, c, h, w = y.size()
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            return self.c(y.chunk(2, dim=1)[1])

    _, gs = _groups(Net(), 1, 3, 4, 4)
    ga, gb = _by_producer(gs, "a")[0], _by_producer(gs, "b")[0]
    assert ga.frozen is None and gb.frozen is None
    # shuffled order a0 b0 a1 b1 | a2 b2 a3 b3: the second half holds a2, a3 and b2, b3
    np.testing.assert_array_equal(ga.readers[0].channels, [2, -1, 3, -1])
    np.testing.assert_array_equal(gb.readers[0].channels, [-1, 2, -1, 3])


def test_module_called_twice_is_one_decision():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.shared, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.head(self.shared(torch.relu(self.shared(self.stem(x)))))

    _, gs = _groups(Net(), 1, 3, 4, 4)
    # the shared conv reads the stem's and its own channels with one weight: all one group
    assert len(_by_producer(gs, "stem")) == 1 and _by_producer(gs, "stem")[0] is _by_producer(gs, "shared")[0]


class ChannelScale(nn.Module):
    """A custom per-channel op: x * weight[c]."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1)


def test_custom_op_freezes_without_a_rule_and_prunes_with_one():
    from passes import ChannelPrune, Shrink
    from surgery.verify import max_rel_diff, run_eval
    net = nn.Sequential(nn.Conv2d(3, 8, 3), ChannelScale(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(1, 3, 10, 10)
    gm, gs = _groups(net, 1, 3, 10, 10, leaf_modules=[ChannelScale])
    assert "ChannelScale '1' has no channel rule" in _by_producer(gs, "_0")[0].frozen
    saved = dict(RULES)
    try:
        register_rule(ChannelScale, channel_local(params={"weight": 0}, values="apply"))
        gs = channel_groups(gm)
        assert _by_producer(gs, "_0")[0].frozen is None
        masked = surgery.compress(gm, [ChannelPrune(ratio=0.5)], example_inputs=(x,))
        small = surgery.compress(masked, [Shrink()], example_inputs=(x,))
        assert small.get_submodule("1").weight.shape == (4,)
        x2 = torch.randn(1, 3, 10, 10)
        assert max_rel_diff(run_eval(masked, (x2,)), run_eval(small, (x2,))) < 1e-5
    finally:
        RULES.clear()
        RULES.update(saved)
    # the per-call form leaves the global table alone
    assert channel_groups(gm, rules={ChannelScale: channel_local(params={"weight": 0})})[0].frozen is None
    assert ChannelScale not in RULES


def test_needs_shapes():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(SurgeryError, match="example_inputs"):
        channel_groups(gm)


def test_attention_projections_are_frozen_not_crashed():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 16)
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.mha(h, h, h)[0])

    _, gs = _groups(Attn(), 2, 5, 6)
    assert "MultiheadAttention" in _by_producer(gs, "inp")[0].frozen


def test_library_rules_load_when_the_library_is_imported_after_the_analysis():
    """Rules for timm's, torchvision's and transformers' layers wait for the library (importing
    the channel analysis does not import them, which costs seconds); the first analysis after the
    library is loaded registers them."""
    code = ("import sys\nimport surgery.channels, surgery.channels.rules\n"
            "from surgery.channels import RULES\n"
            "assert not {'timm', 'torchvision', 'transformers'} & set(sys.modules), 'imported too early'\n"
            "import torch, timm, surgery\n"
            "from timm.layers import BatchNormAct2d, StdConv2d\n"
            "from torchvision.ops.misc import Permute\n"
            "before = [c in RULES for c in (BatchNormAct2d, StdConv2d, Permute)]\n"
            "m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()\n"
            "surgery.channel_groups(surgery.capture(m, (torch.randn(1, 3, 8, 8),)))\n"
            "print(before, [c in RULES for c in (BatchNormAct2d, StdConv2d, Permute)], "
            "'transformers' in sys.modules)\n")
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[False, False, False] [True, True, True] False"


class LinearNorm(nn.Module):
    """LeViT's Linear + BatchNorm1d over the flattened tokens, shaped back with ``reshape_as``."""

    def __init__(self, a, b):
        super().__init__()
        self.linear, self.bn = nn.Linear(a, b, bias=False), nn.BatchNorm1d(b)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTMLP(nn.Module):
    def __init__(self, d=8, view_as=False):
        super().__init__()
        self.view_as = view_as
        self.embed, self.up, self.down = LinearNorm(4, d), LinearNorm(d, 2 * d), LinearNorm(2 * d, d)
        self.head = nn.Linear(d, 3)
        self.register_buffer("template", torch.zeros(2, 5, d))

    def forward(self, x):
        x = self.embed(x)
        h = nn.functional.hardswish(self.up(x))
        y = self.down(h)
        if self.view_as:  # the shape of a tensor whose channels are not tracked
            y = y.flatten(0, 1).view_as(self.template)
        return self.head(x + y)


def test_reshape_as_follows_the_channels_and_couples_them_with_the_other_tensor():
    from helpers import masked_and_shrunk, n_params, randomise_norms
    masked, small, _ = masked_and_shrunk(randomise_norms(LeViTMLP()), (2, 5, 4))
    # embed 4->4 (+ BN 4), up 4->8 (+ BN 8), down 8->4 (+ BN 4), head 4->3; LeViT's whole stream
    # stayed when reshape_as had no rule
    assert n_params(small) == (16 + 8) + (32 + 16) + (32 + 8) + (12 + 3)
    x = torch.randn(3, 7, 4)
    assert torch.allclose(small(x), masked(x), atol=1e-5)
    _, groups = _groups(LeViTMLP(view_as=True).eval(), 2, 5, 4)
    [down] = _by_producer(groups, "down_linear")
    assert down.frozen == "view_as at node 'view_as' takes the shape of 'template', whose channels are not tracked"
