"""Sparsifier: soft and hard thresholds against the reference formulas, penalties, the
sharpness schedule, harden()/activation_sparsity(), TorchScript export and a short digits run."""
import copy
import io

import pytest
import torch
from torch import nn

import surgery
from passes import Sparsifier, SparsifierModule


def test_soft_threshold_matches_formula():
    m = SparsifierModule(eps=-0.3, a=4.0)  # |eps| is the threshold
    x = torch.linspace(-2, 2, 41)
    ref = torch.sigmoid(4 * (x - 0.3)) * x + torch.sigmoid(4 * (-0.3 - x)) * x
    assert torch.allclose(m(x), ref)


def test_hard_threshold_is_exact_and_not_in_place():
    m = SparsifierModule(eps=0.5, hard=True)
    x = torch.tensor([-1.0, -0.5, -0.2, 0.0, 0.3, 0.5, 0.51, 2.0], requires_grad=True)
    h = x * 1.0  # a non-leaf, as in a network: the reference's in-place write corrupts it
    y = m(h)
    assert torch.equal(y, torch.tensor([-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.51, 2.0]))
    assert torch.equal(h, x)  # input untouched
    y.sum().backward()  # autograd intact
    assert x.grad.tolist() == [1.0, 0, 0, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("kind,normalize", [("l0", True), ("l0", False), ("l1", True), ("l2", False)])
def test_penalties(kind, normalize):
    m = SparsifierModule(eps=0.0, a=1e6, penalty=kind, weight=2.0, normalize=normalize, b=0.1)
    m.train()
    x = torch.tensor([[0.0, 1.0], [-2.0, 0.5]])
    y = m(x)
    t = {"l0": y * y / (y * y + 0.1), "l1": y.abs(), "l2": y * y}[kind]
    expect = 2.0 * (t.mean() if normalize else t.sum())
    assert m.penalty().item() == pytest.approx(expect.item(), rel=1e-6)
    m.eval()
    assert m.penalty().item() == 0.0
    with pytest.raises(surgery.SurgeryError, match="penalty must be one of"):
        SparsifierModule(penalty="l3")


def test_step_doubles_a_on_schedule():
    m = SparsifierModule(a=1.0, double_every=2, a_max=4.0)
    seen = []
    for _ in range(8):
        m.step()
        seen.append(float(m.a))
    assert seen == [1, 2, 2, 4, 4, 4, 4, 4]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def test_harden_copies_and_activation_sparsity_counts_zeros():
    x = torch.randn(5, 1, 4, 4)
    gm = surgery.compress(_net(), [Sparsifier(select="0", eps=0.2)], (x,))
    hard = surgery.harden(gm)
    assert not gm.sparsify_0.hard and hard.sparsify_0.hard
    relu = torch.relu(gm.get_submodule("0")(x))
    expect = float((relu <= 0.2).float().mean())
    assert surgery.activation_sparsity(hard, x) == {"sparsify_0": pytest.approx(expect)}
    assert surgery.activation_sparsity(hard, x, total=True) == pytest.approx(expect)
    with pytest.raises(surgery.SurgeryError, match="no activation sparsifier"):
        surgery.activation_sparsity(_net(), x)


def test_trained_model_can_be_copied_and_hard_one_scripted():
    x = torch.randn(5, 1, 4, 4)
    gm = surgery.compress(_net(), [Sparsifier(select="0", eps=0.2)], (x,))
    gm.train()
    (gm(x).sum() + surgery.penalty(gm)).backward()
    copy.deepcopy(gm)  # the recorded activation is not copied (a non-leaf cannot be)
    hard = surgery.harden(gm).eval()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(hard), buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    assert torch.equal(loaded(x), hard(x))


def test_short_digits_run_raises_sparsity():
    from benchmarks.digits import accuracy, load_digits_split, make_cnn, train
    d = load_digits_split(0)
    base = train(make_cnn(width=8), d.img_train, d.y_train, epochs=4, penalty=False)
    x = d.img_test
    natural = surgery.activation_sparsity(
        surgery.compress(base, [Sparsifier(select=nn.Conv2d, eps=0.0, hard=True)], (x[:2],)), x, total=True)
    gm = surgery.compress(base, [Sparsifier(select=nn.Conv2d, eps=0.1, weight=1.0, double_every=20)], (x[:2],))
    train(gm, d.img_train, d.y_train, epochs=3, lr=1e-3)
    hard = surgery.harden(gm)
    assert surgery.activation_sparsity(hard, x, total=True) > natural + 0.1
    assert accuracy(hard, x, d.y_test) > accuracy(base, x, d.y_test) - 0.05


def test_sparsifier_does_not_block_shrink():
    from passes import DAM, Shrink
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    x = torch.randn(4, 1, 4, 4)
    gm = surgery.compress(net, [DAM(select="0"), Sparsifier(select="0", eps=0.05, hard=True)], (x,))
    with torch.no_grad():
        gm.dam_0.beta.fill_(-2.6)  # closes units 0..3 of 6
    small = surgery.compress(gm, [Shrink()], (x,))
    assert small.get_submodule("0").out_channels == 2
    assert torch.allclose(small.eval()(x), gm.eval()(x), atol=1e-5)
