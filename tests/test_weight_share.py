"""k-means weight sharing: kmeans_1d, WeightShare, centroid fine-tuning, bits_analysis."""
import pytest
import torch
from torch import nn

import surgery
import surgery.weights.kmeans as W
from passes import MagnitudePrune, SharedWeight, WeightShare
from surgery.errors import SurgeryError
from surgery.weights import cluster_tensor, kmeans_1d

X = torch.randn(16, 20)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))


@pytest.mark.parametrize("init", W.INITS)
@pytest.mark.parametrize("n", [1000, (1 << 16) + 5000])  # exact path and histogram path
def test_k_distinct_values_are_recovered_exactly(init, n):
    values = torch.tensor([-2.5, -0.75, -0.1, 0.3, 0.3001, 1.0, 4.0, 9.5])
    x = values[torch.randint(len(values), (n,))]
    c, lab = kmeans_1d(x, 8, init)
    assert torch.equal(c, values) and torch.equal(c[lab], x)


@pytest.mark.parametrize("init", W.INITS)
def test_kmeans_quality_close_to_sklearn(init):
    from sklearn.cluster import KMeans
    x = torch.cat([torch.randn(3000) * 0.1, torch.randn(1000) + 2, torch.rand(500) * 5 - 4])
    c, lab = kmeans_1d(x, 16, init)
    ours = float(((x.double() - c.double()[lab]) ** 2).sum())
    # the same Lloyd from the same start as sklearn's: the same optimum
    p, cnt = torch.unique(x.double(), return_counts=True)
    start = W._init_centroids(p, cnt.double(), 16, init, 0).numpy()[:, None]
    same = KMeans(16, init=start, n_init=1, tol=0, max_iter=1000).fit(x.double().numpy()[:, None]).inertia_
    assert ours == pytest.approx(same, rel=1e-4)
    best = KMeans(16, n_init=4, random_state=0).fit(x.double().numpy()[:, None]).inertia_
    assert ours <= 1.2 * best  # Lloyd's local optimum is not far from sklearn's best of four
    assert torch.equal(torch.sort(c).values, c) and len(torch.unique(c)) == len(c)


def test_kmeans_histogram_path_quality():
    torch.manual_seed(1)
    x = torch.randn(1 << 21)
    c, lab = kmeans_1d(x, 32, "linear")
    exact_c, exact_lab = kmeans_1d(x[: 1 << 19], 32, "linear")
    mse = float(((x - c[lab]) ** 2).mean())
    mse_small = float(((x[: 1 << 19] - exact_c[exact_lab]) ** 2).mean())
    assert mse <= 1.02 * mse_small
    # each centroid is the exact mean of its members
    means = torch.zeros(32, dtype=torch.float64).index_add_(0, lab, x.double()) / torch.bincount(lab).double()
    assert torch.allclose(c.double(), means, atol=1e-6)


def test_kmeans_errors():
    with pytest.raises(SurgeryError, match="init"):
        kmeans_1d(torch.randn(10), 2, "random")
    with pytest.raises(SurgeryError, match="NaN"):
        kmeans_1d(torch.tensor([1.0, float("nan")]), 2)


def test_cluster_tensor_keeps_zeros_and_counts():
    w = torch.randn(50, 40)
    w[w.abs() < 0.5] = 0
    book, idx = cluster_tensor(w, 3)
    shared = torch.cat([book, book.new_zeros(1)])[idx]
    assert torch.equal(shared == 0, w == 0) and len(book) == 8
    assert len(torch.unique(shared[shared != 0])) == 8


def test_weight_share_pass_bits_dict_and_prune_first():
    net = _net()
    gm = surgery.compress(net, [MagnitudePrune(0.8), WeightShare({"0.weight": 2, "2.*": 3}, init="density")],
                          example_inputs=X)
    w0, w2 = gm.get_submodule("0").weight, gm.get_submodule("2").weight
    assert int((w0 == 0).sum()) == round(0.8 * 1280) and int((w2 == 0).sum()) == round(0.8 * 320)
    assert len(torch.unique(w0[w0 != 0])) == 4 and len(torch.unique(w2[w2 != 0])) == 8
    assert not surgery.masks(gm)  # the active masks were baked before sharing
    assert len(torch.unique(net[0].weight)) == 1280  # the caller's model is untouched


def test_centroid_gradient_is_sum_over_members_and_zeros_stay_zero():
    pruned = surgery.finalize(surgery.compress(_net(), [MagnitudePrune(0.5)], example_inputs=X))
    gm = surgery.compress(pruned, [WeightShare(bits=3, finetune=True)], example_inputs=X)
    sw = gm.get_submodule("0").parametrizations.weight[0]
    assert isinstance(sw, SharedWeight)
    # the reference: the same function on a plain weight, and its gradient gathered per cluster
    ref = surgery.finalize(gm)
    ref(X).square().sum().backward()
    gm(X).square().sum().backward()
    idx = sw.index.long().reshape(-1)
    member = idx < len(sw.codebook)
    expect = torch.zeros(len(sw.codebook)).index_add_(0, idx[member], ref.get_submodule("0").weight.grad.reshape(-1)[member])
    assert torch.allclose(sw.codebook.grad, expect, rtol=1e-5, atol=1e-6)
    zeros = gm.get_submodule("0").weight == 0
    opt = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        gm(X).square().sum().backward()
        opt.step()
    w = gm.get_submodule("0").weight
    assert torch.equal(w == 0, zeros) and len(torch.unique(w[w != 0])) <= 8
    plain = surgery.finalize(gm)
    assert torch.equal(plain.get_submodule("0").weight, w) and not surgery.masks(plain)
    assert torch.equal(plain(X), gm(X))


def test_bits_analysis_restores_and_writes(tmp_path):
    net = _net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    table = surgery.bits_analysis(net, lambda m: {"out": float(m(X).detach().abs().sum()),
                                                  "distinct": len(torch.unique(m[2].weight))},
                                  bits=(4, 1), progress=False)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert [(r["tensor"], r["bits"]) for r in table.rows] == [("0.weight", 4), ("0.weight", 1),
                                                               ("2.weight", 4), ("2.weight", 1)]
    assert [r["distinct"] for r in table.rows] == [320, 320, 16, 2]
    table.to_csv(tmp_path / "b.csv")
    table.plot(tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000


@pytest.mark.parametrize("n", [3000, 200_000])
def test_share_tensor_matches_cluster_tensor(n):
    w = torch.randn(n)
    w[w.abs() < 0.3] = 0
    book, idx = W.cluster_tensor(w, 4, "density")
    assert torch.equal(W.share_tensor(w, 4, "density"), W.shared_values(book, idx))


def test_kmeans_far_from_zero_and_extremes():
    x = 1000.0 + torch.rand(100_000, dtype=torch.float64).float() * 1e-2
    c, lab = kmeans_1d(x, 4)
    assert len(c) == 4 and float((x - c[lab]).abs().max()) < 2e-3
    assert int(lab[x.argmax()]) == 3 and int(lab[x.argmin()]) == 0
