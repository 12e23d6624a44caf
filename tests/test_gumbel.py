"""GumbelMask: straight-through hard gates, deterministic eval, penalty, frozen weights, and a
short subnetwork-discovery run on digits."""
import copy

import pytest
import torch
from torch import nn

import surgery
from passes import GumbelGate, GumbelMask


def test_training_gate_is_hard_with_soft_gradient():
    torch.manual_seed(0)
    g = GumbelGate(50, -1, init=0.0)
    g.train()
    x = torch.ones(3, 50)
    y = g(x)
    assert set(y.unique().tolist()) <= {0.0, 1.0} and 0 < y.sum() < 150  # hard, and stochastic at logit 0
    y.sum().backward()
    assert g.logits.grad is not None and (g.logits.grad > 0).all()  # the soft sigmoid's gradient


def test_eval_is_deterministic_and_kept_matches_it():
    g = GumbelGate(4, 1)
    with torch.no_grad():
        g.logits.copy_(torch.tensor([1.0, -1.0, 0.5, -0.1]))
    g.eval()
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(g(x), g(x))
    assert torch.equal(g(x), x * torch.tensor([1.0, 0, 1, 0]).view(1, 4, 1, 1))
    assert g.kept().tolist() == [True, False, True, False]
    assert g.penalty().item() == pytest.approx(1e-4 * 0.4)


def test_freeze_weights_leaves_only_gates_and_trainable_modules():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    gm = surgery.compress(net, [GumbelMask(select=nn.Linear, exclude="4", freeze_weights=True, trainable="4")],
                          (torch.randn(2, 8),))
    trainable = sorted(n for n, p in gm.named_parameters() if p.requires_grad)
    assert trainable == ["4.bias", "4.weight", "gumbel_0.logits", "gumbel_2.logits"]
    assert all(p.requires_grad for p in net.parameters())  # the caller's model is untouched
    with pytest.raises(surgery.SurgeryError, match="trainable"):
        surgery.compress(net, [GumbelMask(select="0", trainable="4")], (torch.randn(2, 8),))


def test_short_subnetwork_discovery_on_digits():
    from benchmarks.digits import balanced_accuracy, load_digits_split, make_mlp, train
    d = load_digits_split(0)
    base = train(make_mlp(), d.x_train, d.y_train, epochs=8, penalty=False)
    net = copy.deepcopy(base)
    torch.manual_seed(0)
    net[4] = nn.Linear(128, 2)
    gm = surgery.compress(net, [GumbelMask(select=nn.Linear, exclude="4", alpha=1e-3, freeze_weights=True,
                                           trainable="4")], (d.x_train[:2],))
    is_zero_tr, is_zero_te = (d.y_train == 0).long(), (d.y_test == 0).long()
    train(gm, d.x_train, is_zero_tr, epochs=10)
    kept = sum(int(m.kept().sum()) for m in surgery.masks(gm).values())
    assert kept < 0.5 * 256  # from all 256 open
    assert balanced_accuracy(gm, d.x_test, is_zero_te) > 0.95
    assert torch.equal(base[0].weight, gm.get_submodule("0").weight)  # frozen
    from passes import Shrink
    small = surgery.compress(gm, [Shrink()], (d.x_test,))
    assert small.get_submodule("0").out_features + small.get_submodule("2").out_features == kept
    assert torch.equal(small(d.x_test).argmax(-1), gm.eval()(d.x_test).argmax(-1))
