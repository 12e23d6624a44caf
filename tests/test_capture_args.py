"""Optional and missing forward arguments during capture (issue 14: every bad input gets a clear error).

Arguments the example inputs leave out are traced at their default (a constant), arguments
they supply stay graph inputs, concrete_args wins over both; what still cannot be traced, or
cannot run on the example inputs, raises a SurgeryError naming the argument, node and module.
"""
import pickle
import re
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

import surgery
from passes import Identity
from surgery import ConfigError, ShapePropagationFailure, SurgeryError, TraceFailure
from surgery.signature import arguments_reaching


class Optional_(nn.Module):
    """A forward with every kind of optional argument: a None mask, a float scale, a bool flag,
    a string mode and a tuple."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x, scale=2.0, mask=None, return_features: bool = False, mode="avg", dims=(2, 3)):
        y = F.relu(self.conv(x)) * scale
        if mask is not None:
            y = y * mask
        f = y.mean(dims) if mode == "avg" else y.amax(dims)
        if return_features:
            return f
        return self.fc(f)


def _placeholders(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {str(n.target): n for n in gm.graph.nodes if n.op == "placeholder"}


def _eval(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return model.eval()


X = torch.rand(2, 3, 8, 8)


def test_unused_optional_arguments_are_traced_at_their_defaults():
    model = _eval(Optional_())
    gm = surgery.capture(model, (X,))
    assert gm.meta["surgery"]["constants"] == {"scale": 2.0, "mask": None, "return_features": False, "mode": "avg",
                                               "dims": (2, 3)}
    assert torch.equal(gm(X), model(X))  # exact: the eager model with its defaults
    # the defaults are constants: only x feeds the output (the other placeholders feed their guards)
    assert list(_placeholders(gm)) == ["x", "scale", "mask", "return_features", "mode", "dims"]
    assert arguments_reaching(gm.graph.find_nodes(op="output")) == ["x"]
    # and the traced module keeps the forward's signature: the defaults can be passed explicitly
    assert torch.equal(gm(X, 2.0, None, False, "avg", (2, 3)), model(X))
    # through compress too (the brief's call), with a pass that runs the graph
    cm = surgery.compress(model, passes=[Identity(select=nn.Conv2d)], example_inputs=(X,))
    assert torch.equal(cm(X), model(X))


def test_a_constant_argument_rejects_another_value_instead_of_ignoring_it():
    model = _eval(Optional_())
    gm = surgery.capture(model, (X,))
    with pytest.raises(AssertionError, match=r"mask was traced as None.*concrete_args=\{'mask'"):
        gm(X, mask=torch.ones(1, 6, 1, 1))
    with pytest.raises(AssertionError, match="scale was traced as 2.0"):
        gm(X, 3.0)
    with pytest.raises(AssertionError, match="return_features was traced as False"):
        gm(X, return_features=True)


def test_graph_module_with_constants_pickles_scripts_and_recaptures():
    model = _eval(Optional_())
    gm = surgery.capture(model, (X,))
    expected = model(X)
    assert torch.equal(pickle.loads(pickle.dumps(gm))(X), expected)  # unpickling re-traces the code
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(gm)
    assert torch.equal(scripted(X), expected)
    assert torch.equal(surgery.capture(gm, (X,))(X), expected)


def test_explicit_concrete_args_override_the_defaults():
    model = _eval(Optional_())
    gm = surgery.capture(model, (X,), concrete_args={"return_features": True, "scale": 3.0, "mode": "max"})
    expected = model(X, scale=3.0, return_features=True, mode="max")
    assert gm(X).shape == (2, 6)  # the features branch, taken without passing the flag again
    assert torch.equal(gm(X), expected)
    assert gm.meta["surgery"]["constants"]["return_features"] is True
    with pytest.raises(AssertionError, match="return_features was traced as True"):
        gm(X, return_features=False)
    # compress passes concrete_args through to capture
    cm = surgery.compress(model, passes=[], example_inputs=(X,), concrete_args={"return_features": True})
    assert torch.equal(cm(X), model(X, return_features=True))


def test_supplied_optional_arguments_stay_inputs():
    model = _eval(Optional_())
    mask = torch.rand(1, 6, 1, 1)
    gm = surgery.capture(model, (X, 3.0, mask))
    phs = _placeholders(gm)
    assert "scale" in phs and "mask" in phs
    assert "scale" not in gm.meta["surgery"]["constants"] and "mask" not in gm.meta["surgery"]["constants"]
    assert torch.equal(gm(X, 3.0, mask), model(X, 3.0, mask))
    other = torch.rand(1, 6, 1, 1)
    assert torch.equal(gm(X, 0.5, other), model(X, 0.5, other))  # other values flow through the graph


def test_a_supplied_none_is_traced_as_a_constant():
    # fx cannot trace `mask is not None` on a placeholder (it is never None): tracing the None
    # keeps the graph exact for it
    model = _eval(Optional_())
    gm = surgery.capture(model, (X, 2.0, None))
    assert gm.meta["surgery"]["constants"]["mask"] is None
    assert torch.equal(gm(X, 2.0, None), model(X))
    assert torch.equal(gm(X, 4.0), model(X, 4.0))


def test_missing_required_argument_raises_trace_failure_naming_it():
    class TwoInputs(nn.Module):
        def forward(self, x, gate, scale=1.0):
            return x * gate * scale

    with pytest.raises(TraceFailure, match=r"needs argument 'gate'") as info:
        surgery.capture(TwoInputs(), (X,))
    assert type(info.value) is TraceFailure
    assert "concrete_args={'gate'" in str(info.value)


def test_bad_argument_lists_raise_naming_the_argument():
    model = Optional_()
    with pytest.raises(ConfigError, match="'scal'.*not an argument of Optional_.forward") as info:
        surgery.capture(model, (X,), concrete_args={"scal": 3.0})
    assert type(info.value) is ConfigError
    with pytest.raises(TraceFailure, match=r"takes 6 positional argument\(s\) but example_inputs has 7") as info:
        surgery.capture(model, (X, 2.0, None, False, "avg", (2, 3), 1))
    assert type(info.value) is TraceFailure
    with pytest.raises(ConfigError, match=r"concrete_args\['scale'\] = 3.0: example_inputs supplies 'scale' = 2.0"):
        surgery.capture(model, (X, 2.0), concrete_args={"scale": 3.0})


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, gate, flag=False):
        h = self.lin(x)
        if gate.sum() > 0:  # data-dependent: no graph can take this branch
            return h
        return -h


def test_data_dependent_branch_on_a_tensor_argument_names_it():
    x = torch.randn(2, 4)
    with pytest.raises(TraceFailure) as info:
        surgery.capture(Gated(), (x, x), descend=False)
    assert type(info.value) is TraceFailure
    msg = str(info.value)
    assert re.search(r"control flow depends on argument\(s\) 'gate'", msg)
    assert "concrete_args={'gate': <value>}" in msg
    assert "'x'" not in msg.split("try:")[1]  # x feeds the layer, not the branch


def test_a_supplied_flag_is_traced_as_a_guarded_constant():
    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, double=False):
            y = self.lin(x)
            return y * 2 if double else y

    x = torch.randn(2, 4)
    model = Flagged()
    gm = surgery.capture(model, (x, True))
    assert gm.meta["surgery"]["constants"] == {"double": True}
    assert torch.equal(gm(x, True), model(x, True))
    with pytest.raises(AssertionError, match="double was traced as True"):
        gm(x, False)


def test_descending_past_a_branch_on_an_argument_names_it_in_the_warning():
    class Composite(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

        def forward(self, x, times=1):
            y = self.body(x)
            return y * times if times > 1 else y

    model = _eval(Composite())
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match=r"model \(TraceError.*argument\(s\) 'times'.*concrete_args=\{'times': 3\}"):
        gm = surgery.capture(model, (x, 3))
    assert gm.meta["surgery"]["shell"] is True and gm.meta["surgery"]["constants"] == {}
    assert torch.equal(gm(x, 3), model(x, 3)) and torch.equal(gm(x, 1), model(x, 1))


def test_iterating_a_tensor_argument_unrolls_behind_a_length_guard():
    class Loop(nn.Module):
        def forward(self, x, scales):
            return sum(x * s for s in scales)

    model, x = Loop(), torch.ones(2)
    gm = surgery.capture(model, (x, torch.tensor([1.0, 2.0])))
    other = torch.tensor([3.0, -1.0])
    assert torch.equal(gm(x, other), model(x, other))
    with pytest.raises(AssertionError, match=r"surgery guard: len .* was traced as 2 .*for s in scales"):
        gm(x, torch.tensor([1.0, 2.0, 3.0]))


class Offset(nn.Module):
    def __init__(self, offset):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.offset = offset

    def forward(self, x):
        return self.lin(x) + self.offset


def test_shape_propagation_failure_names_node_and_module_never_type_error():
    # a string reaching an add: the trace is fine, running it on the example inputs is not
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Offset("a")

        def forward(self, x, bias):
            return self.block(x) + bias

    x = torch.randn(2, 4)
    with pytest.raises(ShapePropagationFailure) as info:
        surgery.capture(Outer(), (x, torch.zeros(4)))
    err = info.value
    assert type(err) is ShapePropagationFailure
    assert isinstance(err, TraceFailure) and isinstance(err, SurgeryError) and not isinstance(err, TypeError)
    assert isinstance(err.__cause__, TypeError)
    assert err.node == "add" and err.module_path == "block"
    assert re.search(r"failed at node 'add' in module 'block': TypeError: unsupported operand", str(err))
    assert "While executing" not in str(err)

    # a supplied argument of the wrong kind is named, with the concrete_args to try
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, shift):
            return self.lin(x) + shift

    with pytest.raises(ShapePropagationFailure, match=r"at node 'add' in module 'Shifted'") as info:
        surgery.capture(Shifted(), (x, {"a": 1}))
    assert type(info.value) is ShapePropagationFailure
    assert "argument(s) 'shift' feed this node" in str(info.value)


def test_shape_propagation_failure_in_a_layer_names_the_layer_and_the_input():
    net = nn.Sequential()
    net.add_module("head", nn.Conv2d(4, 2, 1))
    with pytest.raises(ShapePropagationFailure, match=r"in module 'head'.*to have 4 channels") as info:
        surgery.capture(net, (torch.rand(1, 3, 5, 5),))
    assert type(info.value) is ShapePropagationFailure
    assert "'input' (shape (1, 3, 5, 5), torch.float32)" in str(info.value)


def test_varargs_are_left_to_fx_and_keyword_dicts_stay_one_input():
    class Var(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, *args, scale=2.0, **kwargs):
            return self.lin(x) * scale

    class Batch(nn.Module):  # a dict of tensors is one positional input, as before
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, batch, mask=None):
            y = self.lin(batch["a"]) + batch["b"]
            return y if mask is None else y * mask

    x = torch.randn(2, 4)
    model = _eval(Var())
    gm = surgery.capture(model, (x,))
    assert gm.meta["surgery"]["constants"] == {"scale": 2.0}
    assert torch.equal(gm(x), model(x))
    with pytest.raises(TraceFailure, match="go to \\*args"):
        surgery.capture(model, (x, x))  # fx puts scale before *args: x would land in scale
    model = _eval(Batch())
    batch = {"a": x, "b": torch.randn(2, 4)}
    gm = surgery.capture(model, batch)
    assert gm.meta["surgery"]["constants"] == {"mask": None}
    assert torch.equal(gm(batch), model(batch))


class Backbone(nn.Module):
    """A real network behind a `return_features` flag, as timm/HF-style wrappers have."""

    def __init__(self):
        super().__init__()
        self.net = tvm.resnet18(weights=None)
        self.net.fc = nn.Identity()
        self.head = nn.Linear(512, 10)

    def forward(self, x, return_features: bool = False):
        f = self.net(x)
        if return_features:
            return f
        return self.head(f)


def test_return_features_flag_on_a_torchvision_backbone_traces_the_default_branch():
    model = _eval(Backbone())
    x = torch.rand(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # traced whole: no opaque parts, no shell
        gm = surgery.capture(model, (x,))
    meta = gm.meta["surgery"]
    assert meta["shell"] is False and meta["opaque"] == {}
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"][-1] == "head"
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    feats = surgery.capture(model, (x,), concrete_args={"return_features": True})
    assert "head" not in [n.target for n in feats.graph.nodes if n.op == "call_module"]
    with torch.no_grad():
        assert torch.equal(feats(x), model(x, return_features=True))
