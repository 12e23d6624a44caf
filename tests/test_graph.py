import operator

import pytest
import torch
import torch.fx as fx
import torchvision.models as tvm
from torch import nn

import surgery
from surgery import SurgeryError
from surgery.graph import extract, insert_after, replace_node
from surgery.verify import run_eval


class Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        return x * self.s


@pytest.fixture()
def resnet_gm():
    x = torch.rand(2, 3, 32, 32)
    model = tvm.resnet18(weights=None).eval()
    return model, surgery.capture(model, (x,)), x


def test_insert_identity_keeps_output(resnet_gm):
    model, gm, x = resnet_gm
    node = gm.graph.find_nodes(op="call_module", target="layer1.0.bn1")[0]
    users = list(node.users)
    new = insert_after(gm, node, nn.Identity(), "probe")
    assert list(new.users) == users and list(node.users) == [new]
    gm.graph.lint()
    assert torch.equal(run_eval(gm, (x,)), run_eval(model, (x,)))


def test_insert_rewires_every_user():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3)))
    class Two(nn.Module):
        def forward(self, x):
            return x + x * 2
    gm = fx.symbolic_trace(Two())
    ph = next(iter(gm.graph.nodes))
    insert_after(gm, ph, Scale(10.0), "s")
    assert torch.equal(gm(torch.ones(1)), torch.tensor([30.0]))


def test_insert_names_are_unique():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3)))
    node = gm.graph.find_nodes(op="call_module", target="0")[0]
    a = insert_after(gm, node, nn.Identity(), "probe")
    b = insert_after(gm, node, nn.Identity(), "probe")
    assert a.target == "probe" and b.target == "probe_1"


def test_replace_module_node_with_equivalent_keeps_output(resnet_gm):
    model, gm, x = resnet_gm
    node = gm.graph.find_nodes(op="call_module", target="layer2.1.relu")[0]
    replace_node(gm, node, nn.ReLU())
    assert isinstance(gm.get_submodule("layer2.1.relu"), nn.ReLU)
    assert torch.equal(run_eval(gm, (x,)), run_eval(model, (x,)))


def test_replace_with_function_and_changed_behaviour():
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    relu = gm.graph.find_nodes(op="call_module", target="1")[0]
    replace_node(gm, relu, torch.tanh)
    assert not hasattr(gm, "1")  # the replaced module is gone
    x = torch.randn(4, 3)
    assert torch.equal(gm(x), torch.tanh(gm.get_submodule("0")(x)))


def test_extract_region_keeps_output_exactly(resnet_gm):
    model, gm, x = resnet_gm
    region = [n for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("layer1.")]
    region += [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add
               and any(str(a.target).startswith("layer1.") for a in n.all_input_nodes if a.op == "call_module")]
    call = extract(gm, region, "region")
    assert isinstance(gm.get_submodule(call.target), fx.GraphModule)
    assert not any(n.op == "call_module" and str(n.target).startswith("layer1.") for n in gm.graph.nodes)
    gm.graph.lint()
    assert torch.equal(run_eval(gm, (x,)), run_eval(model, (x,)))


def test_extract_with_several_outputs_and_interleaved_users():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            a = self.a(x)
            side = a * 3          # outside user placed between region nodes
            b = self.b(a)
            return self.c(b) + side + b

    net = Net()
    gm = surgery.capture(net)
    nodes = [n for n in gm.graph.nodes if n.target in ("a", "b")]
    call = extract(gm, nodes, "ab")
    assert call.op == "call_module" and call.target == "ab" and isinstance(gm.get_submodule("ab"), fx.GraphModule)
    assert len(call.users) == 2 and all(u.target is operator.getitem for u in call.users)  # a and b, both read outside
    assert sum(1 for n in gm.graph.nodes if n.target is operator.getitem) == 2
    x = torch.randn(2, 4)
    assert torch.equal(gm(x), net(x))


def test_extract_rejects_non_convex_sets():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    gm = surgery.capture(Net())
    nodes = [n for n in gm.graph.nodes if n.target in ("a", "b")]
    with pytest.raises(SurgeryError, match="not convex.*relu"):
        extract(gm, nodes, "ab")


def test_copy_module_is_a_deep_copy():
    from surgery.copying import copy_module

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight            # tied
            self.bn = nn.BatchNorm1d(3)
            self.sizes = [1, 2]                      # mutable attribute: must not be shared
            self.table = torch.arange(3.0)           # a plain tensor attribute (neither parameter nor buffer)
            self.traced = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU()))  # own __deepcopy__
            self.again = self.a                      # one module under two names

        def forward(self, x):
            return self.traced(self.bn(self.b(self.a(x)))) + self.again(x)

    net = Net().eval()
    net.a.register_forward_hook(lambda m, i, o: o * 2)
    c = copy_module(net)
    x = torch.randn(4, 3)
    assert torch.equal(c(x), net(x))
    assert c.b.weight is c.a.weight and c.again is c.a and c.a is not net.a
    assert c.sizes == [1, 2] and c.sizes is not net.sizes
    assert torch.equal(c.table, net.table) and c.table is not net.table
    ours = {t.data_ptr() for t in (*c.parameters(), *c.buffers())}
    assert not ours & {t.data_ptr() for t in (*net.parameters(), *net.buffers())}
    assert len(c.a._forward_hooks) == 1 and c.a._forward_hooks is not net.a._forward_hooks
    assert not c.bn._forward_hooks and c.bn._forward_hooks is not net.bn._forward_hooks  # empty ones made anew
    c.bn.register_forward_hook(lambda m, i, o: o)
    assert not net.bn._forward_hooks
    net.bn.compile()  # torch.compile's wrapper stays behind, as nn.Module's pickling leaves it
    assert "_compiled_call_impl" in vars(net.bn) and "_compiled_call_impl" not in vars(copy_module(net).bn)
    shared = {id(p): p for p in net.parameters()}
    s = copy_module(net, memo=dict(shared))
    assert s.a.weight is net.a.weight and s.bn.running_mean is not net.bn.running_mean


def test_copy_module_of_classes_with_their_own_setstate():
    from surgery.copying import copy_module
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    lstm = nn.LSTM(4, 5, batch_first=True)
    for m, x in ((conv, torch.randn(1, 2, 6, 6)), (lstm, torch.randn(2, 3, 4))):
        c = copy_module(m)
        assert type(c) is type(m) and torch.equal(c(x)[0], m(x)[0])
        assert all(p is not q for p, q in zip(c.parameters(), m.parameters()))
    c = copy_module(lstm)
    assert all(w is p for w, p in zip(c._flat_weights, c.parameters()))  # the copy computes with its own
    with torch.no_grad():
        c.weight_ih_l0.zero_()
    x = torch.randn(2, 3, 4)
    assert not torch.equal(c(x)[0], lstm(x)[0])


def _with_leftovers():
    """A captured ResNet-18 with dead nodes (one of them impure) and unused submodules."""
    gm = surgery.capture(tvm.resnet18(weights=None).eval(), (torch.rand(1, 3, 32, 32),))
    g = gm.graph
    x = next(iter(g.nodes))
    with g.inserting_before(x.next):  # in order, after the input
        dead = g.call_module("layer1.0.conv1", (x,))                  # pure, unused
        g.call_function(operator.add, (g.call_method("size", (dead,)), 1))  # unused too, after it
        g.call_function(torch._assert, (True, "kept"))               # impure: stays
        g.get_attr("layer4.1.bn2.weight")                             # an unused read
    gm.add_submodule("extra.deep", nn.Linear(2, 2))                   # nothing calls it
    gm.add_submodule("layer4.spare", nn.Linear(2, 2))                 # only its parent is called
    fc = next(n for n in g.nodes if n.target == "fc")
    fc.target = "layer4"  # layer4 is now called whole: its descendants stay, fc goes
    fc.args = (fc.args[0].args[0],)
    return gm


def test_drop_dead_nodes_and_unused_submodules_match_fx():
    from surgery.graph import drop_dead_nodes, drop_unused_submodules
    ours, theirs = _with_leftovers(), _with_leftovers()
    drop_dead_nodes(ours.graph)
    theirs.graph.eliminate_dead_code()
    assert [(n.op, n.target) for n in ours.graph.nodes] == [(n.op, n.target) for n in theirs.graph.nodes]
    assert any(n.target is torch._assert for n in ours.graph.nodes)
    assert not any(n.op == "get_attr" for n in ours.graph.nodes)
    drop_unused_submodules(ours)
    theirs.delete_all_unused_submodules()
    names = [n for n, _ in ours.named_modules()]
    assert names == [n for n, _ in theirs.named_modules()]
    assert "fc" not in names and "extra" not in names and "layer4.spare" in names


def test_tree_modules_is_the_set_modules_yields_root_first():
    from surgery.copying import tree_modules, tied_tensors
    shared = nn.Linear(3, 3)
    net = nn.Sequential(nn.Sequential(shared, nn.ReLU()), shared, nn.ModuleDict({"a": nn.Conv2d(1, 1, 1)}))
    net.add_module("gone", None)
    found = tree_modules(net)
    assert found[0] is net
    assert len(found) == len({id(m) for m in found}) == len(list(net.modules())) == 6  # `shared` once
    assert {id(m) for m in found} == {id(m) for m in net.modules()}
    assert tied_tensors(net) == {}  # a module reachable twice holds its tensors once: nothing is tied
    net[2]["a"].bias = shared.bias  # one tensor in two modules: tied, with both holders' names
    assert [n for n, _, _ in tied_tensors(net)[id(shared.bias)]] == ["0.0.bias", "2.a.bias"]
