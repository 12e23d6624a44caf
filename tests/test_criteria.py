"""ChannelPrune's criteria against hand-computed references, budgets, stages and calibration errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import Tensor, nn

import surgery
from passes import ChannelPrune, Shrink
from passes._importance import position_norms, split_batch
from surgery.io.macs import count_macs

F = nn.functional


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()


def _batches(n: int = 3, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 3, generator=g), torch.randint(0, 2, (5,), generator=g)) for _ in range(n)]


def _scores(model: nn.Module, x, **kw) -> dict[tuple, np.ndarray]:
    gm = surgery.compress(model, [ChannelPrune(**kw)], x)
    return {tuple(v["layers"]): v["scores"] for v in gm.meta["surgery"]["channel_scores"].values()}


def _grads(model: nn.Module, batches, square: bool) -> list[Tensor]:
    """Gradients summed over the batches (squared per batch for the Fisher)."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        for t, g in zip(total, grads):
            t += g ** 2 if square else g
    return total


def test_weight_criteria_match_their_formulas():
    model = _mlp()
    x = (torch.randn(2, 3),)
    w1 = model[0].weight.detach().double()
    np.testing.assert_allclose(_scores(model, x)[("0",)], w1.abs().sum(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(_scores(model, x, criterion="l2")[("0",)], w1.norm(dim=1).numpy(), rtol=1e-6)
    s = (w1 ** 2).sum(1).numpy()  # LAMP on the squared l2 norms: s_i / sum of the scores >= s_i
    want = np.array([si / s[s >= si].sum() for si in s])
    np.testing.assert_allclose(_scores(model, x, criterion="lamp")[("0",)], want, rtol=1e-6)
    assert _scores(model, x, criterion="lamp")[("0",)].max() == pytest.approx(1.0)


@pytest.mark.parametrize("shape, axis", [
    ((600, 500), 0),  # linear rows, over one block (2**18 elements)
    ((3000, 96), 1),  # an embedding's hidden axis: columns
    ((40, 64, 4, 4), 1),  # a transposed conv's output axis, in the middle
    ((300, 400, 3), 2),  # the last axis of a 3-d weight
    ((400_000,), 0),  # a 1-d weight: one value per position
    ((64, 32, 3, 3), 0),  # within one block: torch's vector_norm
    ((0, 8), 1),
])
@pytest.mark.parametrize("order", [1, 2])
def test_position_norms_match_float64(shape, axis, order):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.vector_norm(w.double().movedim(axis, 0).reshape(shape[axis], -1), order, dim=1)
    got = position_norms(w, axis, order)
    assert got.dtype == np.float64 and got.shape == (shape[axis],)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5)


def test_position_norms_of_half_weights_sum_in_float32():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)).half()
    ref = w.double().abs().sum(1).numpy()
    np.testing.assert_allclose(position_norms(w, 0, 1), ref, rtol=1e-6)  # a float16 sum: ~1e-3 off
    big = torch.randn(700, 400, generator=torch.Generator().manual_seed(1)).bfloat16()
    np.testing.assert_allclose(position_norms(big, 1, 2), big.double().norm(dim=0).numpy(), rtol=1e-5)


def test_activation_is_the_readers_weights_times_their_inputs_norm():
    model, batches = _mlp(), _batches()
    with torch.no_grad():
        hidden = torch.cat([model[1](model[0](x)) for x, _ in batches])  # what the second layer reads
    want = hidden.double().norm(dim=0) * model[2].weight.detach().double().abs().sum(0)
    got = _scores(model, (torch.randn(2, 3),), criterion="activation", calibration=batches)[("0",)]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
    # plain input batches (no target) give the same
    got = _scores(model, (torch.randn(2, 3),), criterion="activation", calibration=[x for x, _ in batches])[("0",)]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)


@pytest.mark.parametrize("criterion", ["taylor", "hessian"])
def test_gradient_criteria_sum_over_every_weight_of_the_group(criterion):
    model, batches = _mlp(), _batches()
    w1, b1, w2, _ = [p.detach().double() for p in model.parameters()]
    g1, gb1, g2, _ = [g.double() for g in _grads(model, batches, square=criterion == "hessian")]
    if criterion == "taylor":  # |w * g| over the producer's row and bias and the reader's column
        want = (w1 * g1).abs().sum(1) + (b1 * gb1).abs() + (w2 * g2).abs().sum(0)
    else:  # 1/2 w^2 F, F the per-batch squared gradients summed
        want = 0.5 * ((w1 ** 2 * g1).sum(1) + b1 ** 2 * gb1 + (w2 ** 2 * g2).sum(0))
    got = _scores(model, (torch.randn(2, 3),), criterion=criterion, calibration=batches, loss_fn=F.cross_entropy)
    np.testing.assert_allclose(got[("0",)], want.numpy(), rtol=1e-5)


class Residual(nn.Module):
    """conv1's channels and conv2's are added: one group, two producers."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.conv1(x))
        return self.head(a + self.conv2(a))


@pytest.mark.parametrize("criterion", ["l1", "taylor"])
def test_coupled_layers_get_one_score_per_group(criterion):
    torch.manual_seed(0)
    model = Residual().eval()
    batches = [(torch.randn(2, 3, 8, 8), torch.randn(2, 2, 8, 8)) for _ in range(2)]
    kw = dict(criterion=criterion)
    if criterion == "taylor":
        kw.update(calibration=batches, loss_fn=F.mse_loss)
    scores = _scores(model, (torch.randn(1, 3, 8, 8),), **kw)
    assert list(scores) == [("conv1", "conv2")]  # one group, one vector of 6 scores
    c1, c2, head = model.conv1, model.conv2, model.head
    if criterion == "l1":
        want = c1.weight.abs().sum((1, 2, 3)) + c2.weight.abs().sum((1, 2, 3))
    else:
        params = [c1.weight, c1.bias, c2.weight, c2.bias, head.weight]
        total = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            for t, g in zip(total, torch.autograd.grad(F.mse_loss(model(x), y), params)):
                t += g
        terms = [(p * g).abs() for p, g in zip(params, total)]
        # conv2 reads the group too (its input channels): its weight counts on both axes
        want = (terms[0].sum((1, 2, 3)) + terms[1] + terms[2].sum((1, 2, 3)) + terms[3] + terms[2].sum((0, 2, 3))
                + terms[4].sum((0, 2, 3)))
    np.testing.assert_allclose(scores[("conv1", "conv2")], want.detach().double().numpy(), rtol=1e-5)


def test_calibration_leaves_the_callers_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(2, 3, 6, 6))
    model.train()
    for p in model[0].parameters():
        p.requires_grad_(False)
    stats = model[1].running_mean.clone()
    batches = [(torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))) for _ in range(2)]
    surgery.compress(model, [ChannelPrune(criterion="taylor", calibration=batches, loss_fn=F.cross_entropy)],
                     (torch.randn(1, 3, 6, 6),))
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [False, False] + [True] * 4
    assert torch.equal(model[1].running_mean, stats) and model.training


def _budget_check(model: nn.Module, x: tuple, **kw) -> tuple[float, float]:
    small = surgery.compress(model, [ChannelPrune(**kw), Shrink()], x)
    macs = sum(count_macs(small, x).values()) / sum(count_macs(model, x).values())
    params = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())
    return macs, params


@pytest.mark.parametrize("kw", [dict(target_macs=0.5), dict(target_params=0.5), dict(target_macs=0.3),
                                dict(target_macs=0.5, criterion="lamp")])
def test_budget_lands_within_two_percent_on_resnet18(kw):
    model = torchvision.models.resnet18(weights=None).eval()
    macs, params = _budget_check(model, (torch.randn(1, 3, 64, 64),), **kw)
    target = kw.get("target_macs", kw.get("target_params"))
    assert abs((macs if "target_macs" in kw else params) - target) <= 0.02


class PreNormBlock(nn.Module):
    """Token embeddings, a pre-norm attention block with 8 heads and a GELU MLP, a classifier."""

    def __init__(self, d: int = 64, heads: int = 8):
        super().__init__()
        self.emb, self.heads = nn.Embedding(100, d), heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.cls = nn.Linear(d, 5)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb(ids)
        b, n, d = x.shape
        h = self.ln1(x)
        q, k, v = (f(h).reshape(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.o(a)
        x = x + self.mlp(self.ln2(x))
        return self.cls(x.mean(1))


@pytest.mark.parametrize("kw", [dict(target_macs=0.5), dict(target_params=0.5)])
def test_budget_lands_within_two_percent_on_a_transformer_block(kw):
    torch.manual_seed(0)
    macs, params = _budget_check(PreNormBlock().eval(), (torch.randint(0, 100, (2, 32)),), **kw)
    assert abs((macs if "target_macs" in kw else params) - 0.5) <= 0.02


def test_steps_prune_in_stages_with_finetuning_between():
    model = torchvision.models.resnet18(weights=None).eval()
    x = (torch.randn(1, 3, 32, 32),)
    seen = []

    def finetune(gm: torch.fx.GraphModule, step: int) -> None:
        masks = [m for m in gm.modules() if type(m).__name__ == "HardMask"]
        seen.append((step, sum(int((m.keep == 0).sum()) for m in masks), sum(len(m.keep) for m in masks)))
        gm(*x)  # the masked model runs as it is
    small = surgery.compress(model, [ChannelPrune(ratio=0.6, steps=3, finetune=finetune), Shrink()], x)
    one_shot = surgery.compress(model, [ChannelPrune(ratio=0.6), Shrink()], x)
    assert [s for s, _, _ in seen] == [1, 2]
    assert [round(z / n, 2) for _, z, n in seen] == [0.2, 0.4]  # 0.6 in three equal steps
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in one_shot.parameters())


def test_split_batch_reads_pairs_and_plain_inputs():
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    assert split_batch((x, y), 1, False, 0)[1] is y  # a DataLoader's (x, y) for a one-input model
    assert len(split_batch((x, y), 2, False, 0)[0]) == 2  # a two-input model's inputs
    inputs, target = split_batch(({"ids": x}, y), 1, True, 0)
    assert inputs == {"ids": x} and target is y
    with pytest.raises(surgery.SurgeryError, match=r"calibration batch 3 must be an \(inputs, target\) pair for "
                                                   r"loss_fn, got a tensor of shape \(2, 3\)"):
        split_batch(x, 1, True, 3)


@pytest.mark.parametrize("kw, message", [
    (dict(criterion="taylor", loss_fn=F.cross_entropy), r"criterion='taylor' scores channels on data: pass "
                                                        r"calibration=batches"),
    (dict(criterion="hessian", calibration=[]), r"criterion='hessian' needs loss_fn\(output, target\)"),
    (dict(calibration=[torch.randn(1, 3)]), r"criterion='l1' reads the weights only, so calibration would be unused"),
    (dict(target_macs=0.5, target_params=0.5), r"give target_macs or target_params, not both"),
    (dict(target_macs=0.5, ratio=0.3), r"give a ratio or a target, not both"),
    (dict(target_macs=1.5), r"target_macs"),
    (dict(finetune=print), r"finetune runs between steps; give steps >= 2"),
    (dict(steps=0), r"steps"),
    (dict(criterion="activation", calibration=torch.randn(4, 3)),
     r"calibration is an iterable of batches \(a list, a DataLoader\), got Tensor: wrap one batch in a list"),
    (dict(criterion="activation", calibration=5), r"calibration is an iterable of batches .* got int"),
])
def test_bad_settings_are_named(kw, message):
    with pytest.raises(surgery.SurgeryError, match=message):
        ChannelPrune(**kw)


def test_a_failing_calibration_batch_is_named():
    with pytest.raises(surgery.SurgeryError, match=r"the model fails on calibration batch 1: RuntimeError"):
        surgery.compress(_mlp(), [ChannelPrune(criterion="activation", calibration=[torch.randn(2, 3),
                                                                                    torch.randn(2, 5)])],
                         (torch.randn(2, 3),))
    with pytest.raises(surgery.SurgeryError, match=r"calibration gave no batches"):
        surgery.compress(_mlp(), [ChannelPrune(criterion="activation", calibration=[])], (torch.randn(2, 3),))


def test_mac_counts_include_multihead_attention_in_eval_mode():
    """nn.MultiheadAttention's eval-mode fast path has no flop formula: counted through its plain ops."""
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(1, 5, 16)

    class Self(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x: Tensor) -> Tensor:
            return self.mha(x, x, x, need_weights=False)[0]
    n, e = 5, 16
    want = 3 * n * e * e + 2 * n * n * e + n * e * e  # q, k, v projections; scores; weighted sum; output
    assert sum(count_macs(Self().eval(), (x,)).values()) == want
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_budget_splits_ties_among_dead_units():
    """Half the hidden units never open on the calibration data: they all score 0, and a budget
    between keeping them all and dropping them all is still met (channels are counted, not thresholded)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    with torch.no_grad():
        model[0].bias[::2] = -100.0  # dead
    x = (torch.randn(4, 8),)
    calibration = [torch.randn(16, 8) for _ in range(2)]
    macs, _ = _budget_check(model, x, criterion="activation", calibration=calibration, target_macs=0.8)
    assert abs(macs - 0.8) <= 0.02


def test_budget_counts_only_what_shrink_removes():
    """CaiT's class token joins the stream after the patches' mask point, so a LayerNorm reads
    nonzero values in the stream's masked channels and Shrink keeps them: a budget that counted
    them removed landed at 0.72 of the MACs. Groups whose masks Shrink would keep are left open."""
    from timm.models.cait import Cait
    torch.manual_seed(0)
    model = Cait(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, depth_token_only=1,
                 num_classes=5).eval()
    macs, _ = _budget_check(model, (torch.randn(1, 3, 32, 32),), target_macs=0.5)
    assert abs(macs - 0.5) <= 0.02
