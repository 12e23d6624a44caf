"""Shape annotation: every node's shape and dtype, from the meta run (with its direct shortcuts) or,
where that cannot know them, the real run; equal to the real run either way, and leaving the model alone."""
import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torch.nn import functional as F

import surgery

from helpers import torchvision_model

x64 = (torch.rand(1, 3, 64, 64),)
x224 = (torch.rand(1, 3, 224, 224),)


def test_shapes_and_dtypes_annotated():
    gm = surgery.capture(tvm.resnet18(weights=None), (torch.rand(2, 3, 64, 64),))
    node = gm.graph.find_nodes(op="call_module", target="layer2.0.conv1")[0]
    assert node.meta["shape"] == torch.Size([2, 128, 8, 8]) and node.meta["dtype"] == torch.float32
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert out.meta["shape"] == torch.Size([2, 1000])


def test_shape_propagation_keeps_batchnorm_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    gm = surgery.capture(model, (torch.rand(2, 3, 8, 8) * 5,))
    assert torch.equal(gm.get_submodule("1").running_mean, torch.zeros(4))
    assert gm.training


def _mutates_its_list(x, sizes: list):
    sizes[0] = 2  # as swin3d's window-size helper does
    return x * sizes[0]


torch.fx.wrap("_mutates_its_list")


def test_shape_propagation_passes_plain_lists_to_callees():
    class Net(nn.Module):
        def forward(self, x):
            return _mutates_its_list(x, [1, 1])

    x = torch.ones(3)
    gm = surgery.capture(Net(), (x,))
    assert gm.graph.find_nodes(op="call_function", target=_mutates_its_list)[0].meta["shape"] == (3,)
    assert torch.equal(gm(x), 2 * x)


def _runs_on(monkeypatch):
    """Record the device of the first tensor of every ShapeProp run."""
    devices = []
    real = surgery.ShapeProp.propagate

    def spy(self, *args):
        devices.append(next(a.device.type for a in args if isinstance(a, torch.Tensor)))
        return real(self, *args)

    monkeypatch.setattr(surgery.ShapeProp, "propagate", spy)
    return devices


@pytest.mark.parametrize("name,inputs", [("resnet18", x64), ("mobilenet_v3_small", x64), ("vit_b_16", x224),
                                         ("swin_t", x64), ("r3d_18", (torch.rand(1, 3, 4, 32, 32),))])
def test_annotate_shapes_on_meta_equals_the_real_run(name, inputs, monkeypatch):
    from surgery.shapes import annotate_shapes
    model = torchvision_model(name)
    gm = surgery.capture(model)
    devices = _runs_on(monkeypatch)
    params = {n: (p, p.detach().clone()) for n, p in gm.named_parameters()}
    annotate_shapes(gm, inputs)
    assert devices == ["meta"]  # torch.nn layers only: no values computed
    got = {n.name: (n.meta["shape"], n.meta["dtype"]) for n in gm.graph.nodes if n.op != "output"}
    surgery.ShapeProp(gm).propagate(*inputs)
    assert got == {n.name: (n.meta["shape"], n.meta["dtype"]) for n in gm.graph.nodes if n.op != "output"}
    for n, (p, before) in params.items():  # the real tensors are back, unchanged
        assert gm.get_parameter(n) is p and torch.equal(p, before)
    assert all(b.device.type == "cpu" for b in gm.buffers())


def test_annotate_shapes_runs_for_real_where_meta_cannot(monkeypatch):
    class DataDependent(nn.Module):  # torch.nn layers only, but an output shape depends on values
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x), torch.nonzero(x > 0)

    class Caches(nn.Module):  # user code (kept opaque): may keep what it sees
        def forward(self, x):
            self.seen = x * 1
            return x

    x = torch.tensor([[1.0, -1.0, 2.0, 3.0], [-1.0, -2.0, 0.5, -3.0]])
    devices = _runs_on(monkeypatch)
    gm = surgery.capture(DataDependent(), (x,))
    assert devices == ["meta", "cpu"]  # the meta run cannot know nonzero's size: the real run redid it
    nz = next(n for n in gm.graph.nodes if n.target is torch.nonzero)
    assert nz.meta["shape"] == torch.Size([4, 2])
    devices.clear()
    gm = surgery.capture(nn.Sequential(Caches(), nn.Linear(4, 3)), (x,), leaf_modules=[Caches])
    assert devices == ["cpu"] and gm.get_submodule("0").seen.device.type == "cpu"


class _Shortcuts(nn.Module):
    """Every layer and function the meta run computes shapes for directly, in their odd forms."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, stride=2, padding=2, dilation=2)
        self.same = nn.Conv1d(8, 8, 4, padding="same", padding_mode="reflect")
        self.valid = nn.Conv1d(8, 6, 3, padding="valid", bias=False)
        self.c2 = nn.Conv2d(6, 4, (3, 1), stride=(2, 1), padding=(1, 0), groups=2)
        self.c3 = nn.Conv3d(4, 2, 2)
        self.pool1 = nn.AdaptiveAvgPool1d(5)
        self.pool2 = nn.AdaptiveAvgPool2d((None, 3))
        self.pool3 = nn.AdaptiveAvgPool3d(1)
        self.lin = nn.Linear(5, 7)
        self.register_buffer("mean", torch.zeros(6))
        self.register_buffer("var", torch.ones(6))
        self.gamma = nn.Parameter(torch.ones(5))

    def forward(self, x):
        y = self.valid(self.same(self.c1(x)))                     # (2, 6, L)
        y = F.batch_norm(y, self.mean, self.var, weight=self.var, training=False)
        y = F.layer_norm(y, (y.shape[-1],)) + F.layer_norm(y[..., :5], [5], self.gamma)[..., :1]
        z = self.c2(y.unsqueeze(-1))                               # (2, 4, L', 1)
        v = self.c3(z.unsqueeze(-1).expand(-1, -1, -1, 2, 2))      # (2, 2, L'-1, 1, 1)
        k = (x[:, 0, :3] * 10).long()                              # int64 (2, 3)
        s = k * 0.5 + k[:1]                                        # int * float -> float; (2, 3) + (1, 3)
        return (self.lin(self.pool1(y)) * 2, self.pool2(z) - 1, torch.mul(self.pool3(v), 3), torch.add(s, k),
                k - 1, y.shape[0] + 1)


def test_meta_shape_shortcuts_equal_the_real_run(monkeypatch):
    from surgery.shapes import annotate_shapes
    x = torch.rand(2, 3, 40)
    gm = surgery.capture(_Shortcuts())
    devices = _runs_on(monkeypatch)
    annotate_shapes(gm, (x,))
    assert devices == ["meta"]
    got = {n.name: (n.meta["shape"], n.meta["dtype"]) for n in gm.graph.nodes}
    surgery.ShapeProp(gm).propagate(x)
    assert got == {n.name: (n.meta["shape"], n.meta["dtype"]) for n in gm.graph.nodes}
    add = next(n for n in gm.graph.nodes if n.target is torch.add)
    assert got[add.name] == (torch.Size([2, 3]), torch.float32)


class _FunctionShortcuts(nn.Module):
    """The functions and methods the meta run computes shapes for directly, in their odd forms."""

    def forward(self, x):                                          # (2, 4, 6, 10)
        a = F.gelu(x, approximate="tanh") + torch.sigmoid(x).relu() + F.dropout(x, 0.1, False)
        m = (x.mean((2, 3), keepdim=True), x.mean(-1), torch.mean(x, dim=[1, -1]), x.mean(dim=1, keepdim=True))
        s = (F.softmax(x, dim=-1), x.softmax(1), F.log_softmax(x, -2), F.softmax(x, -1, dtype=torch.float64))
        i = (F.interpolate(x, scale_factor=1.7, mode="bilinear"), F.interpolate(x, size=(3, 5)),
             F.interpolate(x, scale_factor=(0.5, 2), mode="nearest"), F.interpolate(x[:, :, 0], size=7, mode="linear",
                                                                               align_corners=True))
        q, k, v = x[:, :, :5], x, x[..., :3]                       # L=5, S=6, Ev=3
        att = (F.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, scale=0.5),
               F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool)))
        return a, m, s, i, att, x.long().mean(dtype=torch.float32)


def test_meta_function_shortcuts_equal_the_real_run(monkeypatch):
    from surgery.shapes import annotate_shapes
    x = torch.rand(2, 4, 6, 10)
    gm = surgery.capture(_FunctionShortcuts())
    devices = _runs_on(monkeypatch)
    fell_back = []  # what the shortcuts handed to torch's own meta kernels
    for name in ("interpolate", "scaled_dot_product_attention"):
        real = getattr(F, name)
        monkeypatch.setattr(F, name, lambda *a, real=real, name=name, **k: fell_back.append(name) or real(*a, **k))
    annotate_shapes(gm, (x,))
    assert devices == ["meta"]
    assert fell_back == ["scaled_dot_product_attention"]  # the one with a mask
    got = {n.name: (n.meta["shape"], n.meta["dtype"]) for n in gm.graph.nodes}
    surgery.ShapeProp(gm).propagate(x)
    assert got == {n.name: (n.meta["shape"], n.meta["dtype"]) for n in gm.graph.nodes}
    sizes = {n.name: n.meta["shape"] for n in gm.graph.nodes}
    assert sizes["interpolate"] == torch.Size([2, 4, 10, 17])  # floor(6 * 1.7), floor(10 * 1.7)
    assert sizes["scaled_dot_product_attention"] == torch.Size([2, 4, 5, 3])


class _FunctionalNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        return F.layer_norm(F.batch_norm(x, self.mean, self.var), [4])


@pytest.mark.parametrize("model,x,message", [
    (nn.Sequential(nn.Conv2d(3, 4, 3)), torch.rand(1, 5, 8, 8), "expected input.*to have 3 channels"),
    (nn.Sequential(nn.Conv2d(3, 4, 5)), torch.rand(1, 3, 4, 4), "Kernel size can't be greater"),
    (nn.Sequential(nn.Linear(4, 2)), torch.rand(3, 5), "cannot be multiplied"),
    (nn.Sequential(nn.BatchNorm2d(4)), torch.rand(1, 5, 8, 8), "running_mean should contain 5 elements"),
    (nn.Sequential(nn.BatchNorm2d(4)), torch.rand(1, 4, 8), "expected 4D input"),
    (nn.Sequential(nn.LayerNorm(4)), torch.rand(1, 8, 5), "normalized_shape=\\[4\\]"),
    (_FunctionalNorm(), torch.rand(2, 5, 3), "running_mean should contain 5 elements"),
    (_FunctionalNorm(), torch.rand(2, 4, 3), "normalized_shape=\\[4\\]"),
])
def test_meta_shape_shortcuts_leave_bad_input_to_the_layer(model, x, message, monkeypatch):
    devices = _runs_on(monkeypatch)
    with pytest.raises(surgery.ShapePropagationFailure, match=message) as info:
        surgery.capture(model, (x,))
    assert isinstance(info.value.__cause__, (RuntimeError, ValueError))  # the layer's own error
    assert devices == ["meta", "cpu"]  # the shortcut declined, the layer failed on meta, the real run raised
