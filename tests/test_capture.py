import warnings

import pytest
import torch
import torch.fx as fx
import torchvision.models as tvm
from torch import nn

import surgery
from surgery import TraceFailure
from surgery.verify import max_abs_diff, run_eval

from helpers import torchvision_model

# A dozen representative torchvision models: (family module, name, input).
x64 = (torch.rand(1, 3, 64, 64),)
x224 = (torch.rand(1, 3, 224, 224),)
MODELS = [
    ("resnet18", x64), ("mobilenet_v3_small", x64), ("densenet121", x64), ("efficientnet_b0", x64),
    ("convnext_tiny", x64), ("shufflenet_v2_x0_5", x64), ("squeezenet1_1", x64), ("regnet_y_400mf", x64),
    ("googlenet", x64), ("vit_b_16", x224), ("swin_t", x64), ("mnasnet0_5", x64),
    ("deeplabv3_mobilenet_v3_large", x64), ("r3d_18", (torch.rand(1, 3, 4, 32, 32),)),
]


@pytest.mark.parametrize("name,x", MODELS, ids=[m[0] for m in MODELS])
def test_torchvision_capture_is_exact_and_whole(name, x):
    model = torchvision_model(name)
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
    model = torchvision_model("fasterrcnn_mobilenet_v3_large_320_fpn")
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


def test_captured_module_keeps_the_models_training_flags():
    net = tvm.resnet18(weights=None).eval()
    net.layer1.train()  # a mix: the copy keeps each module's own flag
    gm = surgery.capture(net, (torch.rand(1, 3, 32, 32),))
    assert gm.training is False
    flags = {n: m.training for n, m in gm.named_modules()}
    assert flags["layer1"] is True and flags["layer1.0.conv1"] is True and flags["layer2"] is False
    assert flags["layer2.0.conv1"] is False
    assert net.layer1.training is True and net.training is False  # the caller's model is untouched


@pytest.mark.parametrize("name", ["resnet18", "swin_t", "vit_b_16", "googlenet", "shufflenet_v2_x0_5"])
def test_tracer_argument_fast_path_traces_what_fx_traces(name):
    from surgery.capture import _Tracer

    class FxArgs(_Tracer):
        def create_arg(self, a):
            return torch.fx.Tracer.create_arg(self, a)

    model = torchvision_model(name)
    ours, theirs = _Tracer().trace(model), FxArgs().trace(model)
    assert ours.python_code("self").src == theirs.python_code("self").src
    assert [n.format_node() for n in ours.nodes] == [n.format_node() for n in theirs.nodes]


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16", "mobilenet_v3_small"])
def test_graph_module_without_code_is_fx_graph_module_once_compiled(name):
    from surgery.capture import _graph_module
    model = torchvision_model(name)
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
