"""Channel analysis across nested graphs: a model whose top-level forward branches on tensor data
is captured as an eager shell whose children are traced; each child graph is analysed within its
boundary, pruned, shrunk, and the whole model verified."""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import Tensor, nn

import surgery
from passes import DAM, ChannelPrune, Shrink
from surgery.channels import analyze_tree, channel_groups
from surgery.nested import nested_graphs, recording_calls, replay
from surgery.verify import max_abs_diff, run_eval

from helpers import randomise_norms

pytestmark = pytest.mark.filterwarnings("ignore:surgery.capture")  # the eager shell is the point here


class Detector(nn.Module):
    """A detector in miniature: two traced children, and a forward that keeps the entries whose
    score passes a threshold, so what it returns (and whether it returns) depends on the data."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(6, 10, 1), nn.ReLU(), nn.Conv2d(10, 4, 1))

    def forward(self, x: Tensor) -> Tensor:
        scores = self.head(self.backbone(x))
        keep = scores.amax(dim=1) > 0
        if keep.any():  # a branch on tensor data: no graph can hold it, so capture keeps this forward eager
            return scores.permute(0, 2, 3, 1)[keep]
        return scores.new_zeros(0, scores.shape[1])


def _model(cls: type = Detector, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomise_norms(cls(), seed)


def _capture(model: nn.Module, *inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # capture warns about the eager shell
        return surgery.capture(model, inputs)


def _producers(group) -> list[str]:
    return [str(p.node.target) for p in group.producers]


def test_groups_of_each_nested_graph_are_found_with_their_graph_named():
    gm = _capture(_model(), torch.randn(2, 3, 12, 12))
    assert gm.meta["surgery"]["shell"] and set(nested_graphs(gm)) == {"model.backbone", "model.head"}
    groups = channel_groups(gm)
    by_graph = {(g.graph, tuple(_producers(g))): g for g in groups}
    assert set(by_graph) == {("model.backbone", ("0",)), ("model.backbone", ("3",)),
                             ("model.head", ("0",)), ("model.head", ("2",))}
    inner_backbone, inner_head = by_graph["model.backbone", ("0",)], by_graph["model.head", ("0",)]
    assert (inner_backbone.size, inner_head.size) == (8, 10)
    assert inner_backbone.frozen is None and inner_head.frozen is None
    assert [str(p.node.target) for p in inner_backbone.readers] == ["3"]
    # eager code hands the backbone's output to the head unchanged: one group, read in the head
    handed = by_graph["model.backbone", ("3",)]
    assert handed.frozen is None and [(p.graph, str(p.node.target)) for p in handed.readers] == [("model.head", "0")]
    # what the head returns is read by eager code: frozen, the boundary named
    assert by_graph["model.head", ("2",)].frozen.startswith("crosses the eager boundary of 'model.head' (output)")
    # ids run on across the graphs; graphs walked as one are keyed by the first one's path
    assert sorted(g.id for g in groups) == list(range(len(groups)))
    tree = analyze_tree(gm)
    assert list(tree) == ["", "model.backbone"]
    assert [b.path for _, b in tree["model.backbone"].parts] == ["model.backbone", "model.head"]
    assert all(p.node.graph.owning_module is gm.get_submodule(p.graph) for g in groups for p in g.places())


def test_prune_and_shrink_each_nested_graph_exactly():
    model, x = _model(), torch.randn(2, 3, 12, 12)
    masked = surgery.compress(model, [ChannelPrune(ratio=0.5)], example_inputs=(x,))
    names = set(surgery.masks(masked))
    assert len(names) == 3 and {n.rsplit(".", 1)[0] for n in names} == {"model.backbone", "model.head"}
    small = surgery.compress(masked, [Shrink()], example_inputs=(x,))
    assert small.get_submodule("model.backbone.0").out_channels == 4
    assert small.get_submodule("model.backbone.3").in_channels == 4
    assert small.get_submodule("model.backbone.3").out_channels == 3  # handed to the head: cut on both sides
    assert small.get_submodule("model.head.0").in_channels == 3
    assert small.get_submodule("model.head.0").out_channels == 5
    assert small.get_submodule("model.head.2").in_channels == 5
    # by hand: backbone.0 loses 4 x (3*9 weights + 1 bias), its BN 4 x 2, backbone.3 4 inputs x 6*9
    # and 3 outputs x (4*9 + 1); head.0 3 inputs x 10 and 5 outputs x (3 + 1), head.2 5 inputs x 4
    before = sum(p.numel() for p in model.parameters())
    assert before == 792
    gone = (4 * 28 + 4 * 2 + 4 * 54 + 3 * 37) + (3 * 10 + 5 * 4 + 5 * 4)
    assert sum(p.numel() for p in small.parameters()) == before - gone == 275
    assert small.report.params_after == 275 and {g.graph for g in small.report.groups if g.after < g.before} == \
        {"model.backbone", "model.head"}
    assert not surgery.masks(small)
    for seed in range(3):  # fresh inputs: the masked and the shrunk model agree, eager shell and all
        y = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(seed))
        a, b = run_eval(masked, (y,)), run_eval(small, (y,))
        assert a.shape == b.shape and max_abs_diff(a, b) < 1e-5
    # the masks are live in the generated code eager code calls (not only in the graph)
    assert not torch.equal(run_eval(masked, (x,)), run_eval(model, (x,)))


def test_unit_masks_go_into_the_nested_graphs():
    gm = surgery.compress(_model(), [DAM()], example_inputs=(torch.randn(2, 3, 12, 12),))
    masks = surgery.masks(gm)
    assert {n.rsplit(".", 1)[0] for n in masks} == {"model.backbone", "model.head"}
    backbone = gm.get_submodule("model.backbone")
    assert any(n.op == "call_module" and n.target.startswith("dam_") for n in backbone.graph.nodes)
    assert "dam_" in backbone.code  # regenerated: eager code runs it


class TiedToEager(Detector):
    """An eager layer that holds the backbone's first weight: resizing it inside the graph would
    change what the eager code computes."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Conv2d(3, 8, 3, padding=1)
        self.aux.weight = self.backbone[0].weight

    def forward(self, x: Tensor) -> Tensor:
        scores = self.head(self.backbone(x))
        if scores.mean() > 0:  # on tensor data: eager
            return scores + self.aux(x).mean()
        return scores


class TwoLevels(Detector):
    """The head runs on two feature levels of different sizes, as a detection head does; inside it,
    a flatten spreads the channels over an axis whose size changes between the two calls."""

    def __init__(self):
        super().__init__()
        self.head = Level()

    def forward(self, x: Tensor) -> list[Tensor]:
        f = self.backbone(x)
        levels = [self.head(f), self.head(nn.functional.max_pool2d(f, 2))]
        if levels[0].mean() > 0:  # on tensor data: eager
            return levels
        return levels[::-1]


class Level(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Conv2d(6, 4, 1), nn.Conv2d(4, 7, 1), nn.Conv2d(6, 9, 1), nn.Conv2d(9, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.a(x)
        y = self.b(torch.flatten(y, 1).reshape(y.shape))  # a's channels vary along the flattened axis
        return y.sum(1, keepdim=True) + self.d(self.c(x).relu())


def test_boundary_freezes_name_the_boundary():
    gm = _capture(_model(TiedToEager), torch.randn(2, 3, 12, 12))
    (tied,) = [g for g in channel_groups(gm) if g.graph == "model.backbone" and _producers(g) == ["0"]]
    assert tied.frozen == ("model.aux.weight holds the same tensor outside 'model.backbone', so eager code may "
                           "use it: it crosses the eager boundary")

    gm = _capture(_model(TwoLevels), torch.randn(2, 3, 12, 12))
    head = {tuple(_producers(g)): g for g in channel_groups(gm) if g.graph == "model.head"}
    assert head["a",].frozen and head["c",].frozen is None  # convolutions alone do not care about the sizes
    reasons = [why for _, why in analyze_tree(gm)["model.head"].frozen]  # every reason, not only the first
    assert "'flatten' changes its size along axis 1 between the calls that eager code makes to 'model.head'" in reasons
    ph = gm.get_submodule("model.head").graph.find_nodes(op="placeholder")[0]
    assert ph.meta["shape"] == (2, 6, 12, 12) and ph.meta["shape_varies"] == (2, 3)
    x = torch.randn(2, 3, 12, 12)
    small = surgery.compress(gm, [ChannelPrune(ratio=0.5), Shrink()], example_inputs=(x,))
    assert small.get_submodule("model.head.c").out_channels == 5  # ceil(9 / 2) kept
    assert small.get_submodule("model.head.a").out_channels == 4  # frozen: whole


def _replayed_error(masked: nn.Module, small: nn.Module, *inputs, handed: dict[str, Tensor] | None = None
                    ) -> dict[str, float]:
    """Per nested graph: the largest relative difference between what it returned in the masked
    model's run and what its shrunk self returns for the same arguments. `handed`: a graph whose
    output eager code hands to the next one (path -> the channels the shrunk one keeps, axis 1):
    its output is compared on those, and the next graph is given those alone."""
    handed = handed or {}
    with recording_calls(masked) as calls, torch.no_grad():
        masked(*inputs)
    paths = list(calls)
    narrowed = {path: [((a[0].index_select(1, handed[paths[i - 1]]),) if i and paths[i - 1] in handed else a, kw, o)
                       for a, kw, o in seen] for i, (path, seen) in enumerate(calls.items())}
    again = replay(small, narrowed)
    leaves = torch.utils._pytree.tree_leaves
    return {path: max((float((u - v).abs().max() / u.abs().max())
                       for (*_, ref), got in zip(seen, again[path])
                       for u, v in zip(leaves(ref.index_select(1, handed[path]) if path in handed else ref),
                                       leaves(got))), default=0.0)
            for path, seen in calls.items()}


def test_shrink_verifies_each_nested_graph_on_what_eager_code_gave_it():
    model, x = _model(), torch.randn(2, 3, 12, 12)
    masked = surgery.compress(model, [ChannelPrune(ratio=0.5)], example_inputs=(x,))
    small = surgery.shrink(masked, (x,))
    assert len(surgery.masks(masked)) == 3 and not surgery.masks(small)  # a copy was shrunk, nested graphs and all
    kept = torch.nonzero(masked.get_submodule("model.backbone.prune_g1").keep).flatten()
    assert len(kept) == 3
    errors = _replayed_error(masked, small, torch.randn(2, 3, 12, 12), handed={"model.backbone": kept})
    assert set(errors) == {"model.backbone", "model.head"} and max(errors.values()) < 1e-5


def test_a_wrong_edit_in_a_nested_graph_is_caught_and_named(monkeypatch):
    apply = importlib.import_module("surgery.shrink.apply")  # surgery.shrink is also the function
    x = torch.randn(2, 3, 12, 12)
    masked = surgery.compress(_model(), [ChannelPrune(ratio=0.5)], example_inputs=(x,))
    edit = apply._edit

    def wrong(cg):  # Shrink as it would be with a bug in how it edits the head's graph
        done = edit(cg)
        parts = {b.path: g for g, b in cg.parts if b is not None}  # the head is walked with the backbone
        if "model.head" in parts:
            with torch.no_grad():
                parts["model.head"].get_submodule("2").bias.add_(1.0)
        return done
    monkeypatch.setattr(apply, "_edit", wrong)
    with pytest.raises(surgery.ShrinkMismatch, match="first differing node 'model.head'"):
        surgery.shrink(masked, (x,))


@pytest.mark.filterwarnings("ignore")
def test_detection_model_prunes_in_backbone_and_heads_and_shrinks_exactly():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
    x = [torch.rand(3, 192, 240)]
    gm = surgery.capture(model.eval(), (x,))
    groups = channel_groups(gm)
    live = [g for g in groups if not g.frozen]
    assert sum(g.graph == "model.backbone" for g in live) >= 20
    assert any(g.graph == "model.roi_heads.box_head" and _producers(g) == ["fc6"] for g in live)
    # the RPN head iterates over its list of feature maps: traced with the list's values known,
    # it is one graph, and the convolution it shares across the levels is one live group
    (rpn,) = [g for g in live if g.graph == "model.rpn.head"]
    assert set(_producers(rpn)) == {"conv.0.0"} and len(rpn.producers) == 3 and rpn.size == 256  # 3 levels
    masked = surgery.compress(gm, [ChannelPrune(ratio=0.5)], example_inputs=(x,))
    small = surgery.compress(masked, [Shrink()], example_inputs=(x,))
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) < 0.6 * before
    assert small.get_submodule("model.roi_heads.box_head.fc6").out_features == 512
    y = [torch.rand(3, 192, 240, generator=torch.Generator().manual_seed(1))]
    a, b = run_eval(masked, (y,)), run_eval(small, (y,))
    assert max_abs_diff(a, b) == 0  # boxes, scores, labels (none pass the score threshold untrained)
    # the box head's features go to the box predictor unchanged: pruned on both sides
    assert small.get_submodule("model.roi_heads.box_head.fc7").out_features == 512
    assert small.get_submodule("model.roi_heads.box_predictor.cls_score").in_features == 512
    box_head = masked.get_submodule("model.roi_heads.box_head")
    node = box_head.graph.find_nodes(op="output")[0].args[0]
    while not str(node.target).startswith("prune_"):
        node = node.args[0]
    kept = torch.nonzero(box_head.get_submodule(str(node.target)).keep).flatten()
    errors = _replayed_error(masked, small, y, handed={"model.roi_heads.box_head": kept})  # graph by graph
    assert set(errors) == {"model.backbone", "model.rpn.head", "model.roi_heads.box_head",
                           "model.roi_heads.box_predictor"}
    assert max(errors.values()) < 1e-5


class Scaled(Detector):
    """Eager code computes with the backbone's output before the head gets it: no hand-off."""

    def forward(self, x: Tensor) -> Tensor:
        scores = self.head(self.backbone(x) * 2)
        return scores if scores.mean() > 0 else -scores


class Returned(Detector):
    """The model returns the backbone's output beside the head's: its channels are the caller's."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.backbone(x)
        scores = self.head(f)
        return (scores, f) if scores.mean() > 0 else (-scores, f)


@pytest.mark.parametrize("cls", [Scaled, Returned])
def test_a_tensor_eager_code_uses_is_no_hand_off(cls):
    gm = _capture(_model(cls), torch.randn(2, 3, 12, 12))
    assert list(analyze_tree(gm)) == ["", "model.backbone", "model.head"]  # each graph on its own
    (last,) = [g for g in channel_groups(gm) if g.graph == "model.backbone" and _producers(g) == ["3"]]
    assert last.frozen.startswith("crosses the eager boundary of 'model.backbone' (output)")


class Levels(nn.Module):
    """Two feature levels in a list, as a detection backbone returns them."""

    def __init__(self):
        super().__init__()
        self.stem, self.down = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> list[Tensor]:
        a = self.stem(x).relu()
        return [a, self.down(a).relu()]


class ListHead(nn.Module):
    """A head that iterates over the levels it is given (SSD's, RetinaNet's): plain fx cannot."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(8, 4, 1), nn.Conv2d(6, 4, 1)])

    def forward(self, feats: list[Tensor]) -> Tensor:
        return torch.cat([conv(f).flatten(2) for conv, f in zip(self.convs, feats)], 2)


class SSDLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.head = Levels(), ListHead()

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone(x)
        out = self.head(feats)
        sizes = [f.shape[-2:] for f in feats]  # eager code reads the levels' sizes (anchors): no values
        keep = out.amax(dim=1) > 0
        if keep.any():  # on tensor data: eager
            return out[:, :, keep[0]] * len(sizes)
        return out


def test_a_head_that_iterates_its_levels_is_traced_and_pruned_with_its_backbone():
    x = torch.randn(2, 3, 12, 12)
    torch.manual_seed(0)
    model = SSDLike().eval()
    gm = _capture(model, x)
    assert set(nested_graphs(gm)) == {"model.backbone", "model.head"}  # the head whole, not conv by conv
    head = gm.get_submodule("model.head")
    with pytest.raises(Exception, match="surgery guard: len .* was traced as 2"):
        head([torch.randn(2, 8, 12, 12)] * 3)  # another number of levels: the guard says so
    (tree,) = [cg for path, cg in analyze_tree(gm).items() if path]
    assert [b.path for _, b in tree.parts] == ["model.backbone", "model.head"]
    live = {tuple(_producers(g)): g for g in channel_groups(gm) if not g.frozen}
    assert set(live) == {("stem",), ("down",)}  # both levels, read by the head's convolutions
    assert {(p.graph, str(p.node.target)) for p in live["stem",].readers} == \
        {("model.backbone", "down"), ("model.head", "convs.0")}
    small = surgery.compress(gm, [ChannelPrune(ratio=0.5), Shrink()], example_inputs=(x,))
    assert small.get_submodule("model.head.convs.0").in_channels == 4
    assert small.get_submodule("model.head.convs.1").in_channels == 3
    # by hand: stem 4 x (27 + 1), down 4 inputs x 6*9 and 3 outputs x (4*9 + 1), convs.0 4 x 4, convs.1 3 x 4
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) == before - (4 * 28 + 4 * 54 + 3 * 37 + 4 * 4 + 3 * 4)
    masked = surgery.compress(gm, [ChannelPrune(ratio=0.5)], example_inputs=(x,))
    for seed in range(3):
        y = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(seed))
        assert max_abs_diff(run_eval(masked, (y,)), run_eval(small, (y,))) < 1e-5


def test_the_report_names_layers_by_their_qualified_names():
    model, x = _model(), torch.randn(2, 3, 12, 12)
    small = surgery.compress(model, [ChannelPrune(ratio=0.5), Shrink()], example_inputs=(x,))
    changed = {p for g in small.report.groups if g.after < g.before for p in g.producers}
    assert changed == {"model.backbone.0", "model.backbone.3", "model.head.0"}  # not node names ("_0")
    assert "model.backbone.3" in str(small.report)
