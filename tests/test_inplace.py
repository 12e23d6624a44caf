"""In-place ops: capture rewrites them out of place where that is exact (later readers of the
changed tensor then read the op's result), and the channel analysis freezes, with the op named,
the channels of those it cannot rewrite. Shrink's own check is never the first to notice."""
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import surgery
from passes import ChannelPrune, Shrink
from surgery.inplace import rewrite_inplace


class InPlaceBranches(nn.Module):
    """relu_() and add_() on tensors that another branch also reads afterwards."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a = self.c1(x)
        b = self.c2(a)
        b.relu_()
        c = self.c3(a)
        c.add_(b)
        return self.head(c) + self.head(b)


def _methods(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_method"]


def test_in_place_ops_read_later_are_rewritten_out_of_place_and_shrink_exactly():
    torch.manual_seed(0)
    model = InPlaceBranches().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = surgery.capture(model, (x,))
    assert _methods(gm) == ["relu", "add"]
    assert torch.equal(gm(x), model(x))
    masked = surgery.compress(model, [ChannelPrune(ratio=0.5)], example_inputs=(x,))
    small = surgery.compress(masked, [Shrink()], example_inputs=(x,))
    assert torch.allclose(small(x), masked(x), atol=1e-5)
    # c1 8 -> 4; c2/c3/head's inputs (one group through the add) 8 -> 4
    assert (small.c1.out_channels, small.c2.out_channels, small.c3.out_channels) == (4, 4, 4)
    assert sum(p.numel() for p in small.parameters()) == (3 * 4 * 9 + 4) + 2 * (4 * 4 * 9 + 4) + (4 * 4 + 4)


def test_flagged_and_module_in_place_ops_are_rewritten():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 6, 3)
            self.act = nn.ReLU(inplace=True)
            self.d = nn.Conv2d(6, 6, 1)

        def forward(self, x):
            a = self.c(x)
            r = self.act(a)
            b = self.d(a)          # reads a after act changed it
            s = F.relu(b, inplace=True)
            return r + b + s, a

    model = Net().eval()
    x = torch.randn(1, 3, 9, 9)
    gm = surgery.capture(model, (x,))
    assert gm.act.inplace is False
    [fn] = [n for n in gm.graph.nodes if n.target is F.relu]
    assert fn.kwargs.get("inplace", fn.args[1] if len(fn.args) > 1 else False) is False
    for got, want in zip(gm(x), model(x)):
        assert torch.equal(got, want)
    assert model.act.inplace is True  # the caller's model is untouched


def test_an_in_place_op_on_a_view_freezes_its_channels_with_the_op_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            b = self.c(x)
            v = b[:, :4]
            v.mul_(2.0)      # changes b through a view: cannot be rewritten
            return self.head(b)

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 10, 10)
    gm = surgery.capture(model, (x,))
    [node] = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "mul_"]
    assert "changes 'getitem' in place" in node.meta["inplace"] and "shares its memory" in node.meta["inplace"]
    [g, _] = surgery.channel_groups(gm)
    assert g.frozen is not None and "in place" in g.frozen
    masked = surgery.compress(model, [ChannelPrune(ratio=0.5)], example_inputs=(x,))
    small = surgery.compress(masked, [Shrink()], example_inputs=(x,))
    assert torch.allclose(small(x), masked(x), atol=1e-5)


def test_torchvision_graphs_need_no_rewrite():
    for build in (torchvision.models.resnet18, torchvision.models.mobilenet_v3_small):
        model = build(weights=None).eval()
        gm = surgery.capture(model, (torch.randn(1, 3, 64, 64),))
        before = gm.code
        rewrite_inplace(gm)
        assert gm.code == before
        assert not any("inplace" in n.meta for n in gm.graph.nodes)
        flags = {n: m.inplace for n, m in model.named_modules() if hasattr(m, "inplace")}
        assert {n: m.inplace for n, m in gm.named_modules() if hasattr(m, "inplace")} == flags
        assert any(flags.values())
