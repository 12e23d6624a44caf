"""Groups whose producers each carry some of the channels: a dense block's layers, whose outputs a
concatenation joins and one norm reads (RDNet), and a dual-path block whose convolution feeds a
residual path and a dense one (DPN). One mask realises such a group: each producer's call covers
its runs of the units (``mask(x, runs=...)``), so masked, pruned and shrunk models agree."""
import pytest
import torch
import torch.nn.functional as F
from helpers import Scale, insert_shared_mask, n_params
from torch import nn

import surgery
from passes import DAM, ChannelPrune, GumbelMask, Shrink
from passes.channel_prune import HardMask
from surgery.channels import channel_groups
from surgery.errors import SurgeryError


class DenseBlock(nn.Module):
    """Each layer reads everything before it and adds 4 channels; one GroupNorm reads all 14."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.l1 = nn.Conv2d(6, 4, 3, padding=1)
        self.l2 = nn.Conv2d(10, 4, 3, padding=1)
        self.norm = nn.GroupNorm(1, 14)
        self.head = nn.Conv2d(14, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, F.relu(self.l1(x))], 1)
        x = torch.cat([x, self.l2(x)], 1)
        return self.head(self.norm(x)).mean((2, 3))


class DualPath(nn.Module):
    """DPN's block: one convolution's first 6 outputs add to the residual path, the other 2 join
    the dense path; the joined paths go through one GroupNorm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.GroupNorm(1, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        y = self.stem(x)
        res, dense = y[:, :6], y[:, 6:]
        z = self.block(torch.cat([res, dense], 1))
        res = res + z[:, :6]
        dense = torch.cat([dense, z[:, 6:]], 1)
        return self.head(self.norm(torch.cat([res, dense], 1)).mean((2, 3)))


def _trained_norm(model: nn.Module) -> nn.Module:
    """`model` with a GroupNorm whose affine terms are not the identity's (a fresh one's are)."""
    torch.manual_seed(1)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
    return model.eval()


def _group(gm, size):
    (group,) = [g for g in channel_groups(gm) if g.size == size and not g.frozen]
    return group


def test_each_producer_of_a_dense_block_masks_its_own_run_of_the_units():
    x = torch.randn(2, 3, 8, 8)
    gm = surgery.capture(_trained_norm(DenseBlock()), (x,))
    points = {p.node.name: p.runs for p in _group(gm, 14).mask_points()}
    # stem and l2 take their runs directly; l1's call goes after its relu; the norm's output
    # (its bias makes a masked channel nonzero) takes the whole mask
    assert points == {"stem": ((0, 6),), "relu": ((6, 10),), "l2": ((10, 14),), "norm": None}


def test_a_dense_block_shrinks_exactly_to_the_hand_counted_size():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = _trained_norm(DenseBlock())
    gm = surgery.capture(model, (x,))
    f = torch.rand(14) + 0.5
    f[[1, 7, 8, 12]] = 0  # one channel of the stem's, two of l1's, one of l2's
    insert_shared_mask(gm, _group(gm, 14), Scale(f, -3), "m")
    small = surgery.compress(gm, [Shrink()], (x,))
    # stem 5x3+5, l1 2x5x9+2, l2 3x7x9+3, the norm's 10 kept pairs, head 5x10+5
    assert n_params(model) == 24 + 220 + 364 + 28 + 75
    assert n_params(small) == 20 + 92 + 192 + 20 + 55
    x2 = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x2), gm(x2), rtol=1e-5, atol=1e-5)


def test_a_dual_path_convolution_masks_two_runs_of_the_units():
    x = torch.randn(2, 3, 8, 8)
    gm = surgery.capture(_trained_norm(DualPath()), (x,))
    runs = {p.node.name: p.runs for p in _group(gm, 10).mask_points()}
    assert sorted(r for r in runs.values() if r is not None) == [((0, 6), (8, 10)), ((0, 8),)]


def test_channel_prune_halves_a_dual_path_stream_and_shrink_agrees():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = _trained_norm(DualPath())
    masked = surgery.compress(model, [ChannelPrune(ratio=0.5)], (x,))
    (mask,) = [m for m in surgery.masks(masked).values() if m.units == 10]
    runs = [n.kwargs.get("runs") for n in masked.graph.nodes if n.op == "call_module" and
            isinstance(masked.get_submodule(str(n.target)), HardMask) and n.kwargs.get("runs")]
    assert ((0, 6), (8, 10)) in runs
    assert mask.kept().tolist() == [True, False, True, True, True, False, False, False, False, True]
    small = surgery.compress(masked, [Shrink()], (x,))
    x2 = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x2), masked(x2), rtol=1e-5, atol=1e-5)
    # the residual path keeps 4 of 6, the dense path the block's last unit and one of the stem's
    # two (masked, so kept at a zero scale: a slice y[:, 6:] of no channel would not run)
    shapes = {k: tuple(v.shape) for k, v in small.state_dict().items() if not k.endswith("_scale")}
    assert shapes == {"stem.weight": (5, 3, 1, 1), "stem.bias": (5,), "block.weight": (5, 5, 3, 3),
                      "block.bias": (5,), "norm.weight": (6,), "norm.bias": (6,), "head.weight": (3, 6),
                      "head.bias": (3,)}
    assert (n_params(model), n_params(small)) == (669, 283)


def test_for_a_model_in_its_own_classes_normalised_false_leaves_groups_masked_over_runs():
    """DualPath's forward slices y[:, :6] and y[:, 6:]: widths its class keeps, so a model shrunk
    into its own classes cannot lose those channels; normalised=False (paired with
    Shrink(into="modules")) leaves such groups (and those a norm reads), and the model comes back
    whole in its class."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = _trained_norm(DualPath())
    small = surgery.compress(model, [ChannelPrune(ratio=0.5, normalised=False), Shrink(into="modules")], (x,))
    assert type(small) is DualPath and n_params(small) == n_params(model) == 669
    with pytest.raises(SurgeryError, match=r"reads a tensor 'prune_g0_scale' .* ChannelPrune\(normalised=False\)"):
        surgery.compress(model, [ChannelPrune(ratio=0.5), Shrink(into="modules")], (x,))


def test_dam_closes_the_first_units_of_a_dense_block_everywhere_they_are_made():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    masked = surgery.compress(_trained_norm(DenseBlock()), [DAM(select=("stem", "l1", "l2"))], (x,))
    (dam,) = [m for m in surgery.masks(masked).values() if m.units == 14]
    with torch.no_grad():
        dam.beta.fill_(-5.0 * 7 / 14 + 1e-3)  # mu + beta <= 0 for units 0..6: the stem's 6 and l1's first
    assert dam.kept().tolist() == [False] * 7 + [True] * 7
    small = surgery.compress(masked, [Shrink()], (x,))
    x2 = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x2), masked(x2), rtol=1e-5, atol=1e-5)
    # l1 loses its first unit, the stem all but one of its 6 (closed: l1 must read something)
    out = {name: small.get_submodule(name).out_channels for name in ("stem", "l1", "l2", "head")}
    assert out == {"stem": 1, "l1": 3, "l2": 4, "head": 5}
    assert small.get_submodule("norm").weight.shape == (8,)
    assert n_params(small) == 243


def test_a_call_whose_runs_do_not_match_the_tensor_names_both():
    mask = HardMask(torch.ones(6), 1)
    with pytest.raises(SurgeryError, match=r"HardMask: runs of 3 units on dim 1, got a tensor of shape \(2, 4\)"):
        mask(torch.randn(2, 4), runs=((0, 3),))
    with pytest.raises(SurgeryError, match="HardMask: units 4 to 7 are not among its 6"):
        mask(torch.randn(2, 4), runs=((4, 8),))
    x = torch.randn(2, 4)
    f = torch.tensor([1.0, 0.0, 2.0, 3.0, 0.5, 0.0])
    assert torch.equal(Scale(f, 1)(x, runs=((1, 3), (4, 6))), x * torch.tensor([0.0, 2.0, 0.5, 0.0]))


class Widening(nn.Module):
    """FastViT's and PiT's downsampling: a grouped convolution makes two outputs of each input
    channel, so the next stage's channels come in pairs of the first stage's."""

    def __init__(self):
        super().__init__()
        self.stem, self.b0 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)
        self.down = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.b1, self.head = nn.Conv2d(8, 8, 1), nn.Linear(8, 3)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.b0(F.relu(x))
        y = self.down(x)
        y = y + self.b1(F.relu(y))
        return self.head(y.mean((2, 3)))


def test_a_stage_holding_each_channel_twice_takes_the_mask_twice_in_a_row():
    x = torch.randn(2, 3, 8, 8)
    gm = surgery.capture(Widening().eval(), (x,))
    points = {p.node.name: (p.runs, p.each) for p in _group(gm, 4).mask_points()}
    assert points == {"stem": (None, 1), "b0": (None, 1), "down": (None, 2), "b1": (None, 2)}
    masked = surgery.compress(Widening().eval(), [ChannelPrune(ratio=0.5)], (x,))
    calls = [n.kwargs for n in masked.graph.nodes if n.op == "call_module" and "prune" in str(n.target)]
    assert sorted(kw.get("each", 1) for kw in calls) == [1, 1, 2, 2]
    small = surgery.compress(masked, [Shrink()], (x,))
    x2 = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x2), masked(x2), rtol=1e-5, atol=1e-5)
    # 2 of 4 channels, and their 4 of 8 outputs: stem 2x3+2, b0 2x2+2, down 4x1x9+4, b1 4x4+4, head 3x4+3
    assert (n_params(Widening()), n_params(small)) == (16 + 20 + 80 + 72 + 27, 8 + 6 + 40 + 20 + 15)


def test_a_call_with_each_repeats_every_factor_in_a_row():
    f = torch.tensor([1.0, 0.0, 2.0])
    x = torch.randn(2, 6)
    assert torch.equal(Scale(f, 1)(x, each=2), x * torch.tensor([1.0, 1.0, 0.0, 0.0, 2.0, 2.0]))
    with pytest.raises(SurgeryError, match=r"Scale: expected 3 units, each 2 times on dim 1, got a tensor of shape"):
        Scale(f, 1)(torch.randn(2, 4), each=2)


@pytest.mark.parametrize("model", [DualPath, Widening])
def test_masked_models_script_save_and_compute_the_same(model, tmp_path):
    """A model with masks in it (calls over runs of units, or each unit twice) scripts, as the
    shrunk one does: ChannelPrune's, DAM's and GumbelMask's (eval: its decision)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for p in (ChannelPrune(ratio=0.5), DAM(), GumbelMask()):
        masked = surgery.compress(_trained_norm(model()) if model is DualPath else model().eval(), [p], (x,)).eval()
        torch.jit.save(torch.jit.script(masked), tmp_path / "m.pt")
        with torch.no_grad():
            torch.testing.assert_close(torch.jit.load(tmp_path / "m.pt")(x), masked(x))


def test_a_csp_split_is_left_for_a_model_in_its_own_classes():
    """timm's CSPResNet splits its stream at a width its code keeps (``x.split(...)``); its
    cross-stage groups need masks over runs of units. normalised=False leaves them, so the model
    comes back in its own classes, smaller, equal to the masked one; the graph form prunes them."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("cspresnet50", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    masked = surgery.compress(model, [ChannelPrune(ratio=0.5, normalised=False)], (x,))
    assert not any(n.kwargs.get("runs") for n in masked.graph.nodes if n.op == "call_module")
    small = surgery.compress(masked, [Shrink(into="modules")], (x,))
    assert type(small) is type(model) and n_params(small) < n_params(model)
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-4, atol=1e-5)
    graph = surgery.compress(model, [ChannelPrune(ratio=0.5)], (x,))
    assert any(n.kwargs.get("runs") for n in graph.graph.nodes if n.op == "call_module")
