"""DAM: the gate formula, penalty, cold start, placement per channel group, and a short
digits run that shows the penalty closing units."""
import copy

import pytest
import torch
from torch import nn

import surgery
from passes import DAM, DAMMask


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def test_gate_formula_and_kept():
    m = DAMMask(10, -1)
    mu = torch.arange(10) * 5.0 / 10
    assert torch.allclose(m.factors(), torch.relu(torch.tanh(mu + 1.0)))
    assert m.kept().all()
    with torch.no_grad():
        m.beta.fill_(-2.25)  # mu_j + beta <= 0 exactly for j <= 4 (mu_4 = 2.0, mu_5 = 2.5)
    assert m.kept().tolist() == [False] * 5 + [True] * 5
    x = torch.randn(4, 10)
    assert torch.equal(m(x), x * m.factors())


def test_penalty_is_lam_times_mean_of_clamped_beta():
    net = _mlp()
    gm = surgery.compress(net, [DAM(select=nn.Linear, exclude="4", lam=0.3)], (torch.randn(2, 8),))
    masks = list(surgery.masks(gm).values())
    assert len(masks) == 2 and all(isinstance(m, DAMMask) for m in masks)
    with torch.no_grad():
        masks[0].beta.fill_(0.5)
        masks[1].beta.fill_(-9.0)  # clamped at -5
    assert surgery.penalty(gm).item() == pytest.approx(0.3 * (0.5 + -5.0) / 2)


def test_cold_start_freezes_beta_then_releases_it():
    gm = surgery.compress(_mlp(), [DAM(select="0", lam=0.1, cold_start=2)], (torch.randn(2, 8),))
    mask = next(iter(surgery.masks(gm).values()))
    for i in range(3):
        gm.zero_grad()
        (gm(torch.randn(4, 8)).sum() + surgery.penalty(gm)).backward()
        grad = mask.beta.grad
        if i < 2:
            assert grad is not None and grad.abs().item() == 0.0  # zero, not missing (DDP needs it)
        else:
            assert grad.abs().item() > 0
        surgery.step(gm)


def test_placement_after_bn_and_activation_and_axes():
    net = nn.Sequential(nn.Conv1d(2, 6, 3), nn.BatchNorm1d(6), nn.ReLU(), nn.Conv1d(6, 4, 3))
    gm = surgery.compress(net, [DAM(select="0")], (torch.randn(2, 2, 10),))
    order = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert order == ["0", "1", "2", "dam_0", "3"]
    assert gm.dam_0.units == 6 and gm.dam_0.dim in (1, -2)
    net3 = nn.Sequential(nn.Conv3d(1, 5, 1), nn.ReLU(), nn.Conv3d(5, 2, 1))
    gm3 = surgery.compress(net3, [DAM(select="0")], (torch.randn(1, 1, 3, 3, 3),))
    assert gm3.dam_0.units == 5 and gm3.dam_0.dim in (1, -4)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        s = s + self.b(torch.relu(self.a(s)))
        return self.head(s)


def test_coupled_layers_share_one_mask():
    gm = surgery.compress(_Residual(), [DAM(select=nn.Conv2d)], (torch.randn(1, 3, 6, 6),))
    masks = surgery.masks(gm)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in masks]
    # stem and b feed one residual stream: one mask called at both producers; a has its own
    assert len(masks) == 2 and len(calls) == 3
    shared = [t for t in masks if calls.count(t) == 2]
    assert len(shared) == 1 and masks[shared[0]].units == 8


def test_caller_model_is_not_mutated():
    net = _mlp()
    before = copy.deepcopy(net.state_dict())
    gm = surgery.compress(net, [DAM(select=nn.Linear, exclude="4")], (torch.randn(2, 8),))
    gm(torch.randn(3, 8)).sum().backward()
    assert not any("dam" in n for n, _ in net.named_modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_short_digits_run_closes_units_and_keeps_accuracy(tmp_path):
    from benchmarks.digits import accuracy, load_digits_split, make_mlp, train
    d = load_digits_split(0)
    gm = surgery.compress(make_mlp(), [DAM(select=nn.Linear, exclude="4", lam=0.1)], (d.x_train[:2],))
    train(gm, d.x_train, d.y_train, epochs=12, lr=2e-2)
    kept = sum(int(m.kept().sum()) for m in surgery.masks(gm).values())
    assert kept < 0.6 * 256  # the penalty closed a large share of the hidden units (all 256 start open)
    assert accuracy(gm, d.x_test, d.y_test) > 0.9
    # Shrink realises the decision: physically smaller, same function, exported
    from passes import Shrink
    small = surgery.compress(gm, [Shrink()], (d.x_test,))
    assert small.get_submodule("0").out_features + small.get_submodule("2").out_features == kept
    assert not surgery.masks(small)
    assert torch.allclose(small(d.x_test), gm.eval()(d.x_test), atol=1e-5)
    path = surgery.export(small, tmp_path / "dam_mlp.pt", (d.x_test,))
    assert torch.allclose(torch.jit.load(str(path))(d.x_test), small(d.x_test), atol=1e-5)


def test_cnn_masks_shrink_exactly():
    from benchmarks.digits import make_cnn
    x = torch.randn(6, 1, 8, 8)
    gm = surgery.compress(make_cnn(width=8), [DAM(select=nn.Conv2d)], (x,))
    masks = surgery.masks(gm)
    assert sorted(m.units for m in masks.values()) == [8, 16, 16]
    with torch.no_grad():
        for m in masks.values():
            m.beta.fill_(-2.6)  # closes a little over half of each mask's units
    kept = sum(int(m.kept().sum()) for m in masks.values())
    from passes import Shrink
    small = surgery.compress(gm, [Shrink()], (x,))
    assert sum(small.get_submodule(f"conv{i}").out_channels for i in (1, 2, 3)) == kept < 40
    assert torch.allclose(small.eval()(x), gm.eval()(x), atol=1e-5)


def test_nothing_placeable_is_an_error_naming_why():
    net = _mlp()
    with pytest.raises(surgery.SurgeryError, match="frozen"):
        surgery.compress(net, [DAM(select="4")], (torch.randn(2, 8),))  # the head feeds the output


@pytest.mark.parametrize("module", ["passes.dam", "passes.gumbel", "passes.sparsifier",
                                    "surgery.activations.sparsity", "benchmarks.digits", "passes.codecs",
                                    "passes.packing", "surgery.graph", "surgery.shapes", "surgery.pickling"])
def test_docstring_examples_run(module):
    import doctest
    import importlib
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
