"""Normalised residual streams, functional layers and library layers: each pruned exactly.

Every model here is masked by ChannelPrune and shrunk; the shrunk model must equal the masked
one on fresh inputs, have the exact parameter count that the kept widths give, and hold no
module of surgery's (the norms that keep their divisor are plain torch ops)."""
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import surgery
from passes import ChannelPrune, Shrink
from surgery.norms import emit_norm
from surgery.verify import max_abs_diff, run_eval

from helpers import n_params


def _prune(model, x, ratio=0.5):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = surgery.compress(model.eval(), [ChannelPrune(ratio)], example_inputs=(x,))
        small = surgery.compress(masked, [Shrink()], example_inputs=(x,))
    x2 = torch.randn_like(x) * 2 if x.is_floating_point() else torch.randint_like(x, int(x.max()) + 1)
    assert max_abs_diff(run_eval(masked, (x2,)), run_eval(small, (x2,))) < 1e-5
    assert not any(type(m).__module__.startswith(("surgery", "passes")) for m in small.modules()
                   if not isinstance(m, fx.GraphModule))
    return masked, small


# ----------------------------------------------------------------------------------------- norms
def _norm_through_graph(rms: bool, x_kept: torch.Tensor, total: int, w, b, eps):
    """Run emit_norm's ops on the kept channels, in a graph of their own."""
    g = fx.Graph()
    x = g.placeholder("x")
    gw, gb = g.get_attr("w"), (None if rms else g.get_attr("b"))
    node = g.call_function(F.layer_norm, (x, (total,)))
    node.meta["dtype"] = x_kept.dtype
    root = nn.Module()
    root.w, root.b = nn.Parameter(w), nn.Parameter(b)
    emit_norm(node, x, total, x_kept.shape[-1], gw, gb, eps, rms)
    g.output(node)
    return fx.GraphModule(root, g)(x_kept)


@pytest.mark.parametrize("rms", [False, True])
def test_a_norm_keeps_its_divisor_over_the_kept_channels(rms):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) + 0.5
    x[..., 10:] = 0  # the channels a mask zeroed
    w, b = torch.randn(16), torch.randn(16)
    full = F.rms_norm(x, (16,), w, 1e-6) if rms else F.layer_norm(x, (16,), w, b, 1e-6)
    got = _norm_through_graph(rms, x[..., :10], 16, w[:10], b[:10], 1e-6)
    assert torch.allclose(got, full[..., :10], atol=1e-5)
    if not rms:  # without the removed channels' (0 - mean)^2 terms the variance is wrong
        naive = F.layer_norm(x[..., :10], (10,), w[:10], b[:10], 1e-6)
        assert (naive - full[..., :10]).abs().max() > 0.05


class HFRMSNorm(nn.Module):
    """Hugging Face's RMSNorm (Llama): decomposed into pow, mean, rsqrt, a cast and a scale."""

    def __init__(self, d, eps=1e-6, offset=False):
        super().__init__()
        self.weight, self.eps, self.offset = nn.Parameter(torch.randn(d) * 0.1 + 1), eps, offset

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = (1.0 + self.weight.float()) if self.offset else self.weight  # Gemma: 1 + weight
        return scale * h.to(x.dtype)


class PreNormBlock(nn.Module):
    def __init__(self, d, norm):
        super().__init__()
        self.norm1, self.norm2 = norm(d), norm(d)
        self.attn_in, self.attn_out = nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn_out(torch.softmax(self.attn_in(h) @ h.transpose(1, 2), -1) @ h)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, norm, d=16, layers=2, vocab=11):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[PreNormBlock(d, norm) for _ in range(layers)])
        self.norm, self.head = norm(d), nn.Linear(d, 5)

    def forward(self, ids):
        return self.head(self.norm(self.blocks(self.embed(ids))))


def _functional_ln(d):
    class FunctionalLN(nn.LayerNorm):  # its own forward: traced into, F.layer_norm on its own tensors
        def forward(self, x):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    return FunctionalLN(d)


NORMS = {"LayerNorm": nn.LayerNorm, "RMSNorm": nn.RMSNorm, "F.layer_norm": _functional_ln,
         "hf_rms": HFRMSNorm, "gemma_rms": lambda d: HFRMSNorm(d, offset=True)}


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_the_residual_stream_of_a_pre_norm_transformer_is_pruned_exactly(norm):
    model = TinyTransformer(NORMS[norm])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                m.weight.normal_(1, 0.1)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_(0, 0.1)
    ids = torch.randint(0, 11, (2, 7))
    masked, small = _prune(model, ids)
    d, h = 8, 32  # half the stream and half of each MLP stay; attn_in reads and writes the stream
    norms = 2 * 2 + 1
    norm_params = {"LayerNorm": 2 * d, "F.layer_norm": 2 * d}.get(norm, d)
    assert n_params(small) == 11 * d + 2 * (2 * (d * d + d) + (d * h + h) + (h * d + d)) + norms * norm_params + \
        d * 5 + 5
    ids2 = torch.randint(0, 11, (3, 4))  # another batch and length
    assert max_abs_diff(run_eval(masked, (ids2,)), run_eval(small, (ids2,))) < 1e-5


def test_a_layernorm_output_is_a_producer_so_masks_go_after_it():
    gm = surgery.capture(TinyTransformer(nn.LayerNorm).eval(), (torch.randint(0, 11, (2, 7)),))
    stream = next(g for g in surgery.channel_groups(gm) if any(p.node.name == "embed" for p in g.producers))
    assert stream.frozen is None
    points = {p.node.name for p in stream.mask_points()}
    assert {"embed", "norm", "blocks_0_norm1", "blocks_1_norm2"} <= points


# ------------------------------------------------------------------------------ functional and library layers
class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: its own forward calls F.batch_norm on its own tensors."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        assert x.ndim == 4
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         0.1, self.eps)
        return self.act(x)


class PaddedConv(nn.Conv2d):
    """timm's Conv2dSame pattern: pads, then F.conv2d on its own weight."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class PlainSubclass(nn.Conv2d):
    """torchvision's Conv3DSimple pattern: a subclass that only adds set-up: a leaf, as nn.Conv2d."""

    @staticmethod
    def helper():
        return 1


class LayerScale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x.mul(self.gamma.reshape(1, -1, 1, 1))  # ConvNeXt's layer scale, a reshaped parameter


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = PaddedConv(3, 16, 3, padding=0), BatchNormAct(16)
        self.c2, self.scale = PlainSubclass(16, 16, 3, padding=1), LayerScale(16)
        self.c3 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.c3(self.scale(self.c2(self.bn1(self.c1(x)))))


def test_functional_layers_on_a_modules_own_tensors_are_pruned_exactly():
    model = FunctionalNet()
    with torch.no_grad():
        model.bn1.running_mean.normal_(0, 0.2)
        model.bn1.running_var.uniform_(0.5, 1.5)
    gm = surgery.capture(model.eval(), (torch.randn(1, 3, 12, 12),))
    assert "c2" in {str(n.target) for n in gm.graph.find_nodes(op="call_module")}  # the plain subclass is a leaf
    assert type(gm.get_submodule("bn1")) is BatchNormAct  # the traced layer keeps its class in the graph
    _, small = _prune(model, torch.randn(1, 3, 12, 12))
    assert small.get_submodule("c1").out_channels == 8 and small.get_submodule("bn1").num_features == 8
    assert small.get_submodule("c2").in_channels == 8 and small.get_submodule("c2").out_channels == 8
    assert small.get_submodule("scale").gamma.shape == (8,)
    assert n_params(small) == (3 * 8 * 9 + 8) + 2 * 8 + (8 * 8 * 9 + 8) + 8 + (8 * 4 + 4)  # BN: weight, bias


def test_a_subclass_with_its_own_forward_does_not_borrow_its_base_rule():
    class Odd(nn.Linear):
        def forward(self, x):
            return super().forward(x).flip(-1)  # not what nn.Linear computes

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.odd, self.b = nn.Linear(4, 8), Odd(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(self.odd(self.a(x)))

    gm = surgery.capture(Net().eval(), (torch.randn(2, 4),), leaf_modules=[Odd])
    frozen = [g.frozen for g in surgery.channel_groups(gm) if any(p.node.name == "a" for p in g.producers)]
    assert frozen == ["Odd 'odd' has no channel rule"]


def test_gpt2_conv1d_is_a_linear_layer_with_its_weight_transposed():
    transformers = pytest.importorskip("transformers")
    conv1d = transformers.pytorch_utils.Conv1D
    net = nn.Sequential(conv1d(16, 6), nn.GELU(), conv1d(5, 16))
    _, small = _prune(net, torch.randn(2, 3, 6))
    assert small.get_submodule("0").weight.shape == (6, 8) and small.get_submodule("0").nf == 8
    assert small.get_submodule("2").weight.shape == (8, 5)


class ChannelsLastNorm(nn.Module):
    """ConvNeXt's downsampling pattern: an NCHW conv output normalised channels-last."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(3, 16, 3), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(self.norm(y.permute(0, 2, 3, 1)) + y.permute(0, 2, 3, 1))


def test_one_mask_serves_points_with_their_units_on_different_axes():
    masked, small = _prune(ChannelsLastNorm(), torch.randn(1, 3, 8, 8))
    calls = [n for n in masked.graph.nodes if n.op == "call_module" and n.target.startswith("prune_g")]
    assert len(calls) == 2 and sorted(n.kwargs.get("dim", -3) for n in calls) == [-3, -1]
    assert small.get_submodule("conv").out_channels == 8 and small.get_submodule("fc").in_features == 8


class WidthFromInput(nn.Module):
    """MaxViT's pattern: another tensor reshaped with a width read from the stream's shape."""

    def __init__(self):
        super().__init__()
        self.a, self.inner, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        y = self.a(x)
        b, n, d = y.shape
        h = self.inner(y)  # returned: its channels stay
        z = h.reshape(b * n, -1).reshape(b, n, d)
        return self.b(torch.relu(y)) + self.c(z), h


def test_a_width_read_from_one_tensor_does_not_decide_the_axis_it_sizes_in_another():
    """Shrink writes the reshaped axis' own size where the count read from the other tensor was,
    so the two widths need not be tied: a loses half its outputs while inner, returned, keeps 8."""
    gm = surgery.capture(WidthFromInput().eval(), (torch.randn(2, 5, 4),))
    (group,) = [g for g in surgery.channel_groups(gm) if any(p.node.name == "a" for p in g.producers)]
    assert group.frozen is None and group.size == 8
    masked, small = _prune(WidthFromInput(), torch.randn(2, 5, 4))
    assert small.get_submodule("a").out_features == 4 and small.get_submodule("inner").out_features == 8
    assert n_params(small) == (4 * 4 + 4) + (4 * 8 + 8) + (4 * 3 + 3) + (8 * 3 + 3)


class SwiGLU(nn.Module):
    """Llama's gated MLP (separate gate and up) or Phi-3's (one fused gate_up projection)."""

    def __init__(self, fused: bool, d=8, hidden=12):
        super().__init__()
        self.fused = fused
        if fused:
            self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        else:
            self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        if self.fused:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate(x), self.up(x)
        return self.down(F.silu(gate) * up)


@pytest.mark.parametrize("fused", [False, True])
def test_a_gated_mlp_loses_gate_and_up_units_together(fused):
    masked, small = _prune(SwiGLU(fused), torch.randn(2, 5, 8))
    assert n_params(small) == 8 * 6 * 3  # gate, up and down keep 6 of 12 hidden units each
    assert small.get_submodule("down").in_features == 6


def test_a_mask_kept_as_a_scale_still_shows_its_channels_to_the_mask_after_it():
    from helpers import Scale
    net = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3)).eval()
    x = torch.randn(2, 5, 4)
    gm = surgery.capture(net, (x,))
    first = next(n for n in gm.graph.nodes if n.target == "0")
    tokens = surgery.graph.insert_after(gm, first, Scale(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5]), 1), "tokens")
    surgery.graph.insert_after(gm, tokens, Scale(torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0]), -1), "units")
    small = surgery.compress(gm, [Shrink()], example_inputs=(x,))  # verifies itself
    assert small.get_submodule("0").out_features == 4
    assert max_abs_diff(run_eval(gm, (x,)), run_eval(small, (x,))) < 1e-6


class ShapeMadeAtRunTime(nn.Module):
    """GPT-2's final view, ``x.view((-1,) + shape[1:] + (h.size(-1),))``, and GPT-Neo's head split,
    ``x.view(x.size()[:-1] + (heads, head_dim))``: shapes built as tuples while the model runs."""

    def __init__(self):
        super().__init__()
        self.a, self.v, self.o, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        v = self.v(h)
        v = v.view(v.size()[:-1] + (2, 4)).flatten(-2)
        h = h + self.o(v)
        return self.head(h.view((-1,) + x.shape[1:-1] + (h.size(-1),)))


def test_shapes_made_at_run_time_are_rewritten_or_read_again():
    masked, small = _prune(ShapeMadeAtRunTime(), torch.randn(2, 5, 4))
    assert small.get_submodule("a").out_features == 4 and small.get_submodule("v").out_features == 4


class TwoCopies(nn.Module):
    """A channels-last stream joined to itself (as Swin's patch merging joins four phases), then
    normalised: the norm's output holds each channel twice, and its mask takes them twice over."""

    def __init__(self):
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(6, 8), nn.LayerNorm(16), nn.Linear(16, 3)
        with torch.no_grad():
            self.norm.weight.normal_(1, 0.2)
            self.norm.bias.normal_(0, 0.2)

    def forward(self, x):
        y = self.up(x)
        return self.down(self.norm(torch.cat([y, torch.roll(y, 1, 1)], -1)))


def test_a_mask_takes_a_channel_that_a_tensor_holds_several_times_over():
    masked, small = _prune(TwoCopies(), torch.randn(2, 5, 6))
    assert [n.kwargs.get("tile") for n in masked.graph.nodes if n.op == "call_module" and "prune" in str(n.target)
            and n.args[0].target == "norm"] == [2]
    assert (small.up.out_features, small.down.in_features) == (4, 8)
    assert n_params(small) == (6 * 4 + 4) + 2 * 8 + (8 * 3 + 3)


def test_flipped_channels_are_followed():
    class Flip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).flip(-1))  # b reads channel 7 - j at position j

    masked, small = _prune(Flip(), torch.randn(3, 4))
    assert small.a.out_features == 4 and n_params(small) == (4 * 4 + 4) + (4 * 2 + 2)
