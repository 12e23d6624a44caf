import copy
from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torchvision.models as tvm
from torch import nn

import surgery
from passes import Identity, OnesMask
from surgery import SurgeryError


def test_compress_with_identity_pass_is_exact_and_finds_masks():
    model = tvm.resnet18(weights=None).eval()
    x = torch.rand(2, 3, 32, 32)
    gm = surgery.compress(model, passes=[Identity(select=nn.Conv2d)], example_inputs=(x,))
    found = surgery.masks(gm)
    assert len(found) == 20 and all(isinstance(m, OnesMask) for m in found.values())
    assert found["mask_layer1_0_conv1"].units == 64 and found["mask_layer1_0_conv1"].dim == 1
    assert torch.equal(gm(x), model(x))
    assert "Identity(" in gm.meta["surgery"]["passes"][0]


def test_penalty_and_step_go_through_every_mask():
    calls = []

    class Counting(OnesMask):
        def penalty(self):
            return torch.tensor(float(self.units))

        def step(self):
            calls.append(self.units)

    @dataclass
    class Insert:
        def apply(self, gm, ctx):
            for node in surgery.select_nodes(gm, nn.Linear):
                surgery.graph.insert_after(gm, node, Counting(node.meta["shape"][-1], -1), "m")
            return gm

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    gm = surgery.compress(net, passes=[Insert()], example_inputs=(torch.randn(2, 4),))
    assert surgery.penalty(gm).item() == 11.0
    surgery.step(gm)
    assert sorted(calls) == [3, 8]
    assert surgery.penalty(nn.Linear(2, 2)).item() == 0.0


def test_compress_on_graphmodule_copies_unless_inplace():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(2, 4)
    gm = surgery.compress(net, passes=[], example_inputs=(x,))
    gm2 = surgery.compress(gm, passes=[Identity()], example_inputs=(x,))
    assert gm2 is not gm and surgery.masks(gm) == {} and len(surgery.masks(gm2)) == 2
    gm3 = surgery.compress(gm, passes=[Identity()], example_inputs=(x,), inplace=True)
    assert gm3 is gm and len(surgery.masks(gm)) == 2
    with pytest.raises(SurgeryError, match="inplace=True needs a GraphModule"):
        surgery.compress(net, passes=[], inplace=True)


def test_compress_never_mutates_callers_model():
    model = tvm.resnet18(weights=None)
    before = copy.deepcopy(model.state_dict())
    ids = [id(p) for p in model.parameters()]
    gm = surgery.compress(model, passes=[Identity()], example_inputs=(torch.rand(1, 3, 32, 32),))
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    assert [id(p) for p in model.parameters()] == ids
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, OnesMask) for m in model.modules())


@pytest.mark.parametrize("as_graph", [False, True])
def test_compress_result_shares_no_memory_with_the_callers_model(as_graph):
    from passes import ChannelPrune, Shrink
    from surgery.copying import storage_key
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None).eval()
    x = torch.rand(1, 3, 32, 32)
    src = surgery.capture(model, (x,)) if as_graph else model
    before = {k: (v.clone(), v._version) for k, v in src.state_dict().items()}
    small = surgery.compress(src, passes=[ChannelPrune(ratio=0.5), Shrink()], example_inputs=(x,))
    theirs = {storage_key(t) for t in (*src.parameters(), *src.buffers())}
    assert not any(storage_key(t) in theirs for t in (*small.parameters(), *small.buffers()))
    assert all(torch.equal(before[k][0], v) and before[k][1] == v._version for k, v in src.state_dict().items())
    masked = surgery.compress(src, passes=[ChannelPrune(ratio=0.5)], example_inputs=(x,))
    run = surgery.verify.run_eval
    assert surgery.verify.max_rel_diff(run(masked, (x,)), run(small, (x,))) < 1e-5
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_copies_are_copy_on_write_until_either_side_writes():
    # the captured copy holds no second copy of the weights, yet training it (or a pass writing
    # into it, or the caller writing into its own model) never shows on the other side
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    x = torch.randn(4, 3, 8, 8)
    before = copy.deepcopy(net.state_dict())
    gm = surgery.capture(net, (x,))
    assert all(torch._C._is_cow_tensor(t) for t in (*gm.parameters(), *gm.buffers()))
    assert isinstance(gm.get_submodule("0").weight, nn.Parameter)
    gm.train()
    opt = torch.optim.Adam(gm.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        gm(x).square().mean().backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(not torch.equal(before[k], v) for k, v in gm.state_dict().items())  # BN statistics too
    gm2 = surgery.capture(net, (x,))
    with torch.no_grad():
        net[0].weight.zero_()
    assert torch.equal(gm2.get_submodule("0").weight, before["0.weight"])

    @dataclass
    class Writes:  # a pass that writes into the copy's weights and statistics in place
        def apply(self, gm, ctx):
            with torch.no_grad():
                next(gm.parameters()).add_(1.0)
                gm.get_submodule("1").running_mean.add_(1.0)
            return gm

    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8)).eval()
    before = copy.deepcopy(net.state_dict())
    out = surgery.compress(net, passes=[Writes()], example_inputs=(torch.randn(2, 4),))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(out.get_submodule("1").running_mean, torch.ones(8))


def test_lazy_copy_keeps_the_tensor_kind(tmp_path):
    from surgery.copying import lazy_copy
    p = nn.Parameter(torch.randn(3), requires_grad=False)
    q = lazy_copy(p)
    assert type(q) is nn.Parameter and not q.requires_grad and torch.equal(p, q)
    b = torch.randn(3)
    assert type(lazy_copy(b)) is torch.Tensor and not lazy_copy(b).requires_grad
    assert lazy_copy(torch.randn(3).to_sparse()) is None  # deep-copied instead
    assert lazy_copy(torch.empty(3, device="meta")) is None
    assert lazy_copy(torch.nn.parameter.UninitializedParameter()) is None
    # memory torch.load handed over has no allocator: a lazy copy of it would crash when written
    torch.save(torch.ones(3), tmp_path / "t.pt")
    assert lazy_copy(torch.load(tmp_path / "t.pt")) is None
    assert lazy_copy(torch.from_numpy(b.numpy())) is None


def test_buffers_a_forward_writes_stay_the_copys():
    # a forward may write its own buffer even in eval mode: the caller's never changes
    from passes import ChannelPrune, Shrink

    class Counts(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return x

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), Counts(), nn.Conv2d(8, 4, 3)).eval()
    small = surgery.compress(net, [ChannelPrune(ratio=0.5), Shrink()], (torch.randn(1, 3, 8, 8),),
                             leaf_modules=[Counts])
    assert net[2].calls.item() == 0 and small.get_submodule("2").calls.item() > 0


def test_shape_runs_only_where_shapes_change(monkeypatch):
    # capture annotates once; ChannelPrune keeps shapes (no run after it); Shrink runs the masked
    # graph (its reference) and the shrunk one (its check), both through ShapeProp
    from passes import ChannelPrune, Shrink
    runs = []
    real = surgery.ShapeProp.propagate
    monkeypatch.setattr(surgery.ShapeProp, "propagate", lambda self, *a: runs.append(1) or real(self, *a))
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(1, 3, 8, 8)
    small = surgery.compress(net, passes=[ChannelPrune(ratio=0.5), Shrink()], example_inputs=(x,))
    assert len(runs) == 3
    assert [n.meta["shape"][1] for n in small.graph.nodes if n.op == "call_module"] == [4, 4, 4]
    surgery.compress(net, passes=[Identity()], example_inputs=(x,))
    assert len(runs) == 5  # capture, and Identity declares nothing: one more run after it


def test_result_is_a_normal_module_trainable_picklable_scriptable(tmp_path):
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(5, 4)
    gm = surgery.compress(net, passes=[], example_inputs=(x,))
    assert isinstance(gm, fx.GraphModule)
    torch.save(gm, tmp_path / "gm.pt")
    back = torch.load(tmp_path / "gm.pt", weights_only=False)
    assert torch.equal(back(x), net(x))
    assert torch.equal(torch.jit.script(gm)(x), net(x))
    loss = gm(x).pow(2).mean()
    loss.backward()
    assert all(p.grad is not None for p in gm.parameters())


def test_bad_pass_and_bad_model_are_named():
    with pytest.raises(SurgeryError, match="not a pass"):
        surgery.compress(nn.Linear(2, 2), passes=[object()])
    with pytest.raises(SurgeryError, match="expects an nn.Module, got str"):
        surgery.compress("model.pt", passes=[])

    @dataclass
    class Broken:
        def apply(self, gm, ctx):
            return None

    with pytest.raises(SurgeryError, match="Broken.apply returned NoneType"):
        surgery.compress(nn.Linear(2, 2), passes=[Broken()])


def test_identity_without_shapes_says_so():
    with pytest.raises(SurgeryError, match="no known tensor shape.*example_inputs"):
        surgery.compress(nn.Sequential(nn.Linear(2, 2)), passes=[Identity()])


def test_unit_mask_checks_its_axis():
    m = OnesMask(4, 1)
    with pytest.raises(SurgeryError, match="expected 4 units on dim 1"):
        m(torch.zeros(2, 3, 5, 5))


def test_compress_recompiles_after_a_pass_that_edits_without_recompiling():
    @dataclass
    class Negate:  # edits the graph and leaves recompiling to compress
        def apply(self, gm, ctx):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            with gm.graph.inserting_before(out):
                neg = gm.graph.call_function(torch.neg, (out.args[0],))
            out.args = (neg,)
            return gm

    net = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    gm = surgery.compress(net, passes=[Negate()], example_inputs=(x,))
    assert torch.equal(gm(x), -net(x))
