"""Shape-concrete tracing: a forward that iterates a shape, uses a size as a Python int or
branches on one traces whole, stays valid at other sizes where the graph reads sizes at run
time, and raises naming the guard where it specialised. Branches on tensor data still refuse."""
import pytest
import torch
from torch import nn

import surgery


class HeadSplit(nn.Module):
    """Attention-style code fx alone cannot trace: shape unpacking into a view, a size branch."""

    def __init__(self, d: int = 16, head_dim: int = 4):
        super().__init__()
        self.q, self.o, self.head_dim = nn.Linear(d, d), nn.Linear(d, d), head_dim

    def forward(self, x):
        input_shape = x.shape[:-1]
        q = self.q(x).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        if x.size(1) > 100:  # never true here: a guard keeps the graph honest
            q = q * 2
        a = torch.softmax(q @ q.transpose(-1, -2) / self.head_dim ** 0.5, -1) @ q
        return self.o(a.transpose(1, 2).reshape(*input_shape, -1))


class Looped(nn.Module):
    """range() over a size: the loop unrolls for the traced size, behind a guard."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        for i in range(x.size(0)):
            y = y + i
        return y


class DataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = DataBranch()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.inner(x))


def scale(t):  # traced into two nodes unless kept whole
    return t * 2 + 1


class Scaled(nn.Module):
    def forward(self, t):
        return scale(t)


def test_shape_questions_trace_whole_and_stay_valid_at_other_sizes():
    torch.manual_seed(0)
    model = HeadSplit().eval()
    gm = surgery.capture(model, (torch.randn(2, 5, 16),))
    meta = gm.meta["surgery"]
    assert meta["opaque"] == {}
    for shape in [(2, 5, 16), (3, 9, 16), (1, 1, 16)]:
        x = torch.randn(*shape)
        assert torch.equal(gm(x), model(x))
    [guard] = meta["guards"]
    assert "was traced as False" in guard and "if x.size(1) > 100" in guard and "test_concrete.py" in guard
    assert any(n.op == "call_method" and n.target == "view" for n in gm.graph.nodes)


def test_a_guard_raises_where_the_trace_specialised():
    model = Looped().eval()
    gm = surgery.capture(model, (torch.randn(3, 4),))
    assert gm.meta["surgery"]["specialised"] == {"x": [0]}  # the loop's count, not the features
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))
    with pytest.raises(AssertionError, match=r"surgery guard: int .* was traced as 3 at test_concrete.py:\d+ "
                                             r"\(for i in range\(x.size\(0\)\):\)"):
        gm(torch.randn(5, 4))


def test_a_branch_on_tensor_data_is_still_refused():
    with pytest.warns(UserWarning, match="inner"):
        gm = surgery.capture(Outer().eval(), (torch.randn(3, 4),))
    assert list(gm.meta["surgery"]["opaque"]) == ["inner"]
    assert gm.meta["surgery"]["guards"] == []


class Detector(nn.Module):
    """A backbone, then post-processing whose sizes are set by the data: the boxes that pass a
    score threshold. A guard on their count would hold only for images that let as many through."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))
        self.post = Select()

    def forward(self, x):
        return self.post(self.body(x))


class Select(nn.Module):
    def forward(self, out):
        boxes = out[out[:, 0] > 0][:, 1:]
        if boxes.numel() == 0:  # torchvision's batched_nms asks this
            return out.new_zeros(0, 4)
        return boxes[: len(boxes)] * 2


def test_sizes_of_tensors_selected_by_data_take_no_guard_and_stay_eager():
    torch.manual_seed(0)
    model = Detector().eval()
    with pytest.warns(UserWarning, match="post"):
        gm = surgery.capture(model, (torch.randn(6, 4),))
    assert list(gm.meta["surgery"]["opaque"]) == ["post"]
    assert gm.meta["surgery"]["guards"] == []
    for x in [torch.randn(6, 4), torch.randn(9, 4), torch.full((3, 4), -10.0)]:
        assert torch.equal(gm(x), model(x))
    assert model(torch.full((3, 4), -10.0)).shape == (0, 4)  # the branch the example did not take


def test_plain_fx_models_take_no_guards_and_no_values():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    gm = surgery.capture(net, (torch.randn(1, 3, 8, 8),))
    assert gm.meta["surgery"]["guards"] == []
    assert not any(n.target is torch._assert for n in gm.graph.nodes)


def test_timm_registries_and_autowrap_functions_are_honoured():
    timm = pytest.importorskip("timm")
    model = timm.create_model("crossvit_tiny_240", pretrained=False).eval()
    x = torch.randn(1, 3, 240, 240)
    gm = surgery.capture(model, (x,))
    assert gm.meta["surgery"]["opaque"] == {} and torch.equal(gm(x), model(x))
    # its layers are traced: 39 groups (each attention's q, k and v heads are one group)
    assert len(surgery.channel_groups(gm)) == 39
    wrapped = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert wrapped & set(timm.layers._fx.get_notrace_functions())  # called as single nodes
    gm = surgery.capture(Scaled(), (torch.randn(3),), autowrap_functions=[scale])
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [scale]


class _Deep(nn.Module):
    """Forty layers and a size read from a tensor attribute (``x.mT``) after them: plain fx
    refuses the branch, so capture traces concretely."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(40))

    def forward(self, x):
        t = x.mT
        y = t
        for layer in self.layers:
            y = torch.relu(layer(y))
        if t.shape[0] > 4:  # t's value is still needed here, forty layers on
            return y * 2
        return y


def test_a_concrete_trace_frees_each_value_with_its_proxy_and_keeps_attributes(monkeypatch):
    from surgery import concrete
    live, keep = [], concrete.ConcreteTracing._keep

    def counting(self, proxy, value):
        keep(self, proxy, value)
        live.append(sum(isinstance(v, torch.Tensor) for v in self.__dict__["values"].values()))
    monkeypatch.setattr(concrete.ConcreteTracing, "_keep", counting)
    model, x = _Deep().eval(), torch.randn(2, 8, 6)
    gm = surgery.capture(model, (x,))
    assert gm.meta["surgery"]["guards"]  # the branch was traced concretely, behind a guard
    assert len(live) > 80 and max(live) <= 6  # a chain holds a few values at a time, not all 80
    assert torch.equal(gm(x), model(x))


class Counted(nn.Module):
    """A leaf that counts its calls: how many forwards a capture runs."""
    calls = 0

    def forward(self, x):
        Counted.calls += 1
        return x * 2


class CountedHeads(HeadSplit):
    def __init__(self):
        super().__init__()
        self.leaf = Counted()

    def forward(self, x):
        return self.leaf(super().forward(x)).split(8, -1)  # a tuple output


def test_a_concrete_trace_records_the_shapes_a_run_would_and_runs_the_forward_once():
    from surgery.shapes import ShapeProp
    model, x = CountedHeads().eval(), torch.randn(2, 5, 16)
    Counted.calls = 0
    gm = surgery.capture(model, (x,), leaf_modules=[Counted])
    assert Counted.calls == 1  # the trace's values; no second run to annotate (2 before)
    assert gm.meta["surgery"]["guards"]
    got = {n.name: (n.meta["shape"], n.meta["dtype"]) for n in gm.graph.nodes}
    assert got["output"] == ((torch.Size([2, 5, 8]), torch.Size([2, 5, 8])), torch.float32)
    assert any(n.target is torch._assert and got[n.name] == (None, None) for n in gm.graph.nodes)
    ShapeProp(gm).propagate(x)  # a real run records every node again
    assert got == {n.name: (n.meta["shape"], n.meta["dtype"]) for n in gm.graph.nodes}


class BoxRefine(nn.Module):
    """Conditional and Deformable DETR's box head: item assignment on a traced tensor
    (``boxes[..., :2] += reference``), a size check through ``torch._check_with`` and
    ``torch.as_tensor`` of sizes read at run time; the size branch defeats plain fx."""

    def __init__(self):
        super().__init__()
        self.body, self.box, self.ref = nn.Linear(6, 8), nn.Linear(8, 4), nn.Linear(6, 2)

    def forward(self, x):
        if x.shape[1] > 1:
            x = x * 1.0
        torch._check_with(ValueError, x.shape[-1] == 6, lambda: "six features")
        torch._check(x.shape[1] * x.shape[2] == x.shape[1] * 6)
        h = torch.relu(self.body(x))
        sizes = torch.as_tensor([x.shape[1], x.shape[2]], dtype=torch.long)
        boxes = self.box(h)
        boxes[..., :2] += self.ref(x)
        return boxes.sigmoid(), sizes


def test_item_assignment_checks_and_as_tensor_trace_whole_and_shrink_exactly():
    from passes import ChannelPrune, Shrink
    torch.manual_seed(0)
    model, x = BoxRefine().eval(), torch.randn(2, 5, 6)
    gm = surgery.capture(model, (x,))
    assert gm.meta["surgery"]["opaque"] == {}
    sets = [n for n in gm.graph.nodes if n.target is __import__("operator").setitem]
    assert len(sets) == 1 and "in place" in sets[0].meta["inplace"]
    assert sum(n.target is torch._assert for n in gm.graph.nodes) >= 1
    x2 = torch.randn(3, 7, 6)
    for a, b in zip(gm(x2), model(x2)):
        assert torch.equal(a, b)
    small = surgery.compress(model, [ChannelPrune(0.5), Shrink()], (x,))
    assert small.body.out_features == 4 and small.box.out_features == 4  # the assigned-to box channels stay
    masked = surgery.compress(model, [ChannelPrune(0.5)], (x,))
    assert torch.allclose(small(x2)[0], masked(x2)[0], atol=1e-6)
    with pytest.raises(AssertionError, match="_check_with failed"):
        gm(torch.randn(2, 5, 7))  # the check runs in the graph, before the Linear would fail


class Cached(nn.Module):
    """timm ConViT's GPSA: a table built in forward for the input's length (item assignment on
    a fresh tensor) and cached on the module, buffer and plain attribute alike."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("table", torch.zeros(1, 4), persistent=False)
        self.note = None

    def forward(self, x):
        if self.table.shape[0] != x.shape[1]:
            t = torch.zeros(x.shape[1], 4)
            t[:, 0] = 1.0
            self.table, self.note = t, t
        return self.lin(x) + self.table


def test_what_a_traced_forward_caches_on_its_modules_is_put_back():
    from passes import ChannelPrune, Shrink
    torch.manual_seed(0)
    model, x = Cached().eval(), torch.randn(2, 3, 4)
    eager = Cached().eval()
    eager.load_state_dict(model.state_dict())
    want = eager(x)
    gm = surgery.capture(model, (x,))
    assert model.note is None and torch.equal(model.table, torch.zeros(1, 4))  # no proxy left behind
    assert any(n.target is __import__("operator").setitem for n in gm.graph.nodes)
    assert torch.equal(gm(x), want)
    small = surgery.compress(model, [ChannelPrune(0.5), Shrink()], (x,))  # traces the same modules again
    assert model.note is None and torch.equal(model.table, torch.zeros(1, 4))
    assert torch.allclose(small(x), want, atol=1e-6)


class DictCached(nn.Module):
    """timm TinyViT's attention: a tensor computed from a parameter and cached in a dict by
    device; the size branch after it defeats plain fx, so capture traces a second time."""

    def __init__(self):
        super().__init__()
        self.lin, self.bias = nn.Linear(4, 4), nn.Parameter(torch.randn(4))
        self.cache = {}

    def forward(self, x):
        if "cpu" not in self.cache:
            self.cache["cpu"] = self.bias * 2
        y = self.lin(x) + self.cache["cpu"]
        return y * 2 if x.shape[1] > 1 else y


def test_a_proxy_cached_in_a_dict_does_not_reach_the_next_trace():
    model, x = DictCached().eval(), torch.randn(2, 3, 4)
    gm = surgery.capture(model, (x,))
    assert model.cache == {} and gm.meta["surgery"]["opaque"] == {}
    assert torch.allclose(gm(x), DictCached.forward(model, x))
