import warnings

import pytest
import torch
import torch.fx as fx
import torchvision.models as tvm
from torch import nn
from torch.nn import functional as F

import surgery
from surgery import TraceFailure
from surgery.verify import max_abs_diff, run_eval

# A dozen representative torchvision models: (family module, name, input).
x64 = (torch.rand(1, 3, 64, 64),)
x224 = (torch.rand(1, 3, 224, 224),)
MODELS = [
    ("resnet18", x64), ("mobilenet_v3_small", x64), ("densenet121", x64), ("efficientnet_b0", x64),
    ("convnext_tiny", x64), ("shufflenet_v2_x0_5", x64), ("squeezenet1_1", x64), ("regnet_y_400mf", x64),
    ("googlenet", x64), ("vit_b_16", x224), ("swin_t", x64), ("mnasnet0_5", x64),
    ("deeplabv3_mobilenet_v3_large", x64), ("r3d_18", (torch.rand(1, 3, 4, 32, 32),)),
]


def _build(name):
    kw = {"weights": None}
    if name.startswith(("deeplab", "fasterrcnn", "fcn", "lraspp")):
        kw["weights_backbone"] = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tvm.get_model(name, **kw).eval()


@pytest.mark.parametrize("name,x", MODELS, ids=[m[0] for m in MODELS])
def test_torchvision_capture_is_exact_and_whole(name, x):
    model = _build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # capturing these whole must not warn about opaque parts
        gm = surgery.capture(model, x)
    assert gm.meta["surgery"]["opaque"] == {}
    assert max_abs_diff(run_eval(model, x), run_eval(gm, x)) == 0
    # qualified names survive: every call_module target is a module path of the original
    names = dict(model.named_modules())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets and all(t in names for t in targets)


def test_detection_model_captured_with_opaque_data_dependent_parts():
    model = _build("fasterrcnn_mobilenet_v3_large_320_fpn")
    x = ([torch.rand(3, 160, 200)],)
    with pytest.warns(UserWarning, match="opaque"):
        gm = surgery.capture(model, x)
    meta = gm.meta["surgery"]
    assert meta["shell"] is True and "model" in meta["opaque"]
    graphs = [n for n, m in gm.named_modules() if n and isinstance(m, fx.GraphModule)]
    assert "model.backbone" in graphs  # the backbone is traced, its convs are graph nodes
    backbone = gm.get_submodule("model.backbone")
    convs = [n for n in backbone.graph.nodes if n.op == "call_module"
             and isinstance(backbone.get_submodule(n.target), nn.Conv2d)]
    assert len(convs) > 50
    assert max_abs_diff(run_eval(model, x), run_eval(gm, x)) == 0


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # control flow on data: untraceable
            return self.lin(x)
        return -x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.dd = DataDependent()
        self.post = nn.Linear(4, 2)

    def forward(self, x):
        return self.post(self.dd(self.pre(x)))


def test_untraceable_submodule_is_kept_opaque_with_one_warning():
    model = Outer()
    x = torch.randn(3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = surgery.capture(model, (x,))
    msgs = [str(w.message) for w in caught if "opaque" in str(w.message)]
    assert len(msgs) == 1 and "dd" in msgs[0]
    assert list(gm.meta["surgery"]["opaque"]) == ["dd"]
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["pre", "dd", "post"]
    assert torch.equal(gm(x), model(x))


class GatedBlock(nn.Module):
    """Data-dependent itself, with a traceable child block."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        if x.isfinite().all():  # control flow on data: untraceable
            return self.block(x)
        return -x


class OuterGated(Outer):
    def __init__(self):
        super().__init__()
        self.dd = GatedBlock()


def test_an_opaque_module_runs_eagerly_but_its_children_are_traced_and_pruned():
    from passes import ChannelPrune, Shrink

    model, x = OuterGated().eval(), torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"dd \(TraceError: .* at test_capture.py:\d+ \(if x.isfinite\(\).all\(\):"):
        gm = surgery.capture(model, (x,))
    assert list(gm.meta["surgery"]["opaque"]) == ["dd"]  # the smallest module that cannot be traced
    assert isinstance(gm.get_submodule("dd.block"), fx.GraphModule)
    assert torch.equal(gm(x), model(x))
    inner = [g for g in surgery.channel_groups(gm) if g.graph == "dd.block"]
    assert [(g.size, g.frozen) for g in inner][0] == (16, None)  # the hidden width is prunable
    with pytest.warns(UserWarning):
        masked = surgery.compress(model, [ChannelPrune(0.5)], (x,))
        small = surgery.compress(masked, [Shrink()], (x,))
    # the hidden layer keeps 8 of 16 units: 4*8+8 + 8*4+4 in the block, 20 + 10 outside it
    assert sum(p.numel() for p in small.parameters()) == 40 + 36 + 30
    assert torch.allclose(small(x), masked(x), atol=1e-6)


def test_top_level_failure_raises_trace_failure_naming_module_and_fix():
    model = DataDependent()
    with pytest.raises(TraceFailure) as info:
        surgery.capture(model, descend=False)
    msg = str(info.value)
    assert "DataDependent" in msg and "concrete_args" in msg and "leaf_modules" in msg
    with pytest.raises(TraceFailure):
        surgery.capture(model)  # nothing below it can be traced either


def test_leaf_modules_by_name_and_type():
    model = Outer()
    gm = surgery.capture(model, leaf_modules=["dd"])
    assert gm.meta["surgery"]["opaque"] == {}
    assert "dd" in [n.target for n in gm.graph.nodes if n.op == "call_module"]
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 2))
    gm = surgery.capture(net, leaf_modules=[nn.Sequential])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]


def test_concrete_args_steer_control_flow():
    class Flag(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x, double: bool = False):
            y = self.lin(x)
            return y * 2 if double else y

    model = Flag()
    x = torch.randn(2, 3)
    gm = surgery.capture(model, concrete_args={"double": True})
    assert torch.equal(gm(x, True), model(x, True))
    gm = surgery.capture(model, concrete_args={"double": False})
    assert torch.equal(gm(x), model(x))


def test_shapes_and_dtypes_annotated():
    gm = surgery.capture(tvm.resnet18(weights=None), (torch.rand(2, 3, 64, 64),))
    node = gm.graph.find_nodes(op="call_module", target="layer2.0.conv1")[0]
    assert node.meta["shape"] == torch.Size([2, 128, 8, 8]) and node.meta["dtype"] == torch.float32
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert out.meta["shape"] == torch.Size([2, 1000])


def test_capture_never_touches_callers_model():
    model = tvm.resnet18(weights=None).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = [id(p) for p in model.parameters()]
    gm = surgery.capture(model, (torch.rand(2, 3, 32, 32),))
    # training the captured copy must not move the original
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    gm(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert [id(p) for p in model.parameters()] == ids
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(m.training for m in model.modules())
    assert not any(p is q for p in gm.parameters() for q in model.parameters())


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


def test_captured_module_keeps_the_models_training_flags():
    net = tvm.resnet18(weights=None).eval()
    net.layer1.train()  # a mix: the copy keeps each module's own flag
    gm = surgery.capture(net, (torch.rand(1, 3, 32, 32),))
    assert gm.training is False
    flags = {n: m.training for n, m in gm.named_modules()}
    assert flags["layer1"] is True and flags["layer1.0.conv1"] is True and flags["layer2"] is False
    assert flags["layer2.0.conv1"] is False
    assert net.layer1.training is True and net.training is False  # the caller's model is untouched


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
    model = _build(name)
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


@pytest.mark.parametrize("name", ["resnet18", "swin_t", "vit_b_16", "googlenet", "shufflenet_v2_x0_5"])
def test_tracer_argument_fast_path_traces_what_fx_traces(name):
    from surgery.capture import _Tracer

    class FxArgs(_Tracer):
        def create_arg(self, a):
            return torch.fx.Tracer.create_arg(self, a)

    model = _build(name)
    ours, theirs = _Tracer().trace(model), FxArgs().trace(model)
    assert ours.python_code("self").src == theirs.python_code("self").src
    assert [n.format_node() for n in ours.nodes] == [n.format_node() for n in theirs.nodes]


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16", "mobilenet_v3_small"])
def test_graph_module_without_code_is_fx_graph_module_once_compiled(name):
    from surgery.capture import _graph_module
    model = _build(name)
    ours, _ = _graph_module(model, (), None, code=False)
    with pytest.raises(surgery.SurgeryError, match="code was never generated"):
        ours(torch.rand(1, 3, 64, 64))
    ours.recompile()
    theirs, _ = _graph_module(model, (), None)
    assert ours.code == theirs.code and type(ours).__name__ == type(theirs).__name__
    assert [(n, m if type(m) is not nn.Module else None, m.training) for n, m in ours.named_modules()][1:] == \
        [(n, m if type(m) is not nn.Module else None, m.training) for n, m in theirs.named_modules()][1:]
    assert ours.training is theirs.training is False
    for a, b in ((ours.named_parameters(), theirs.named_parameters()), (ours.named_buffers(), theirs.named_buffers())):
        assert [(n, id(t)) for n, t in a] == [(n, id(t)) for n, t in b]
    assert ours._tracer_cls is theirs._tracer_cls and ours.graph.owning_module is ours
    x = x224[0] if name == "vit_b_16" else x64[0]
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x)) and torch.equal(torch.jit.script(ours)(x), theirs(x))


class _FunctionalNorms(nn.Module):
    """Reads its parameters and buffers as attributes and passes them to functions (as timm's
    BatchNormAct2d does), one weight shared under two names."""

    def __init__(self, depth: int = 6):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(depth))
        self.norms = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(depth))
        self.shared = self.convs[0].weight  # a second name for a tensor the tree already holds

    def forward(self, x):
        for conv, bn in zip(self.convs, self.norms):
            x = torch.nn.functional.batch_norm(conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias)
        return x * self.shared.mean()


def test_attributes_read_in_forward_get_fx_names_without_a_search_per_read(monkeypatch):
    model = _FunctionalNorms().eval()
    for bn in model.norms:  # statistics that make a wrong buffer visible in the output
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    calls = {"n": 0}
    named_parameters = nn.Module.named_parameters

    def counted(self, *a, **k):
        calls["n"] += 1
        return named_parameters(self, *a, **k)
    monkeypatch.setattr(nn.Module, "named_parameters", counted)
    gm = surgery.capture(model)
    monkeypatch.undo()
    # the names fx gives: a shared tensor's first name in named_parameters (the root's own
    # come first), every buffer as a get_attr
    reads = sorted(str(n.target) for n in gm.graph.nodes if n.op == "get_attr")
    assert next(n for n, p in model.named_parameters() if p is model.shared) == "shared"
    assert "shared" in reads and "convs.0.weight" not in reads
    assert {f"norms.{i}.running_mean" for i in range(6)} <= set(reads)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(gm(x), model(x))
    # fx searches every parameter per read (2 x 6 norms + 1): that would be 13 searches or more
    assert calls["n"] < 6, calls["n"]


def test_identity_layers_leave_the_graph_unless_hooked():
    """A plain nn.Identity call is dropped from the graph (its layer stays in the tree); one with
    a forward hook keeps its node, and the hook still runs."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Identity(), nn.ReLU(), nn.Identity(), nn.Flatten())
    seen = []
    net[3].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(1, 3, 6, 6)
    gm = surgery.capture(net, (x,))
    assert [n.target for n in gm.graph.find_nodes(op="call_module")] == ["0", "2", "3", "4"]
    assert isinstance(gm.get_submodule("1"), nn.Identity)
    seen.clear()
    assert torch.equal(gm(x), net(x)) and len(seen) == 2
