"""MagnitudePrune, AGP, finalize and sensitivity."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import surgery
from passes import AGP, MagnitudePrune, WeightMask
from surgery.errors import SurgeryError
from surgery.weights import magnitude_mask


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


X = torch.randn(4, 3, 8, 8)


def _zeros(gm, name):
    return int((gm.get_submodule(name).weight == 0).sum())


def test_magnitude_mask_exact_count_with_ties():
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, -3.0])
    m = magnitude_mask(w, 0.5)
    assert int((~m).sum()) == 3 and m[4] and m[5]
    keep = torch.tensor([True, True, True, True, False, True])
    m2 = magnitude_mask(w, 0.5, keep=keep)  # the already-dropped 2.0 goes first, however large
    assert not m2[4] and int((~m2).sum()) == 3


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_pruned_weights_stay_exactly_zero_through_optimizer_steps(opt):
    gm = surgery.compress(_net(), [MagnitudePrune(0.7)], example_inputs=X)
    params = list(gm.parameters())
    optim = torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1) if opt == "sgd" \
        else torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    before = {n: m.kept().clone() for n, m in surgery.masks(gm).items()}
    for _ in range(5):
        optim.zero_grad()
        gm(X).square().mean().backward()
        optim.step()
        surgery.step(gm)
        for name in ("0", "3"):
            mod = gm.get_submodule(name)
            mask = mod.parametrizations.weight[0].mask
            assert torch.all(mod.weight[~mask] == 0)
    assert _zeros(gm, "0") == round(0.7 * 8 * 3 * 9) and _zeros(gm, "3") == round(0.7 * 288 * 10)
    for n, m in surgery.masks(gm).items():
        assert torch.equal(m.kept(), before[n])  # no schedule: the mask does not move


def test_agp_curve_monotone_and_exact_at_end():
    agp = AGP(start_step=10, end_step=50, every=5)
    values = [agp.sparsity_at(t, 0.9) for t in range(80)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[9] == 0.0 and values[50] == 0.9 and values[79] == 0.9 and values[49] < 0.9
    assert values[11] == values[14] == values[10]  # updates only every 5 steps
    assert values[30] == pytest.approx(0.9 - 0.9 * 0.5 ** 3)
    with pytest.raises(SurgeryError, match="start_step < end_step"):
        AGP(5, 5)


def test_agp_masks_reach_target_exactly_and_are_nested():
    gm = surgery.compress(_net(), [MagnitudePrune({"3.weight": 0.9, "0.*": 0.5}, schedule=AGP(2, 12, every=2))],
                          example_inputs=X)
    mask = surgery.masks(gm)["3.parametrizations.weight.0"]
    optim = torch.optim.SGD(gm.parameters(), lr=0.1)
    prev, history = mask.kept().clone(), []
    for t in range(1, 16):
        optim.zero_grad()
        gm(X).square().mean().backward()
        optim.step()
        surgery.step(gm)
        cur = mask.kept().clone()
        assert not torch.any(cur & ~prev)  # pruned entries stay pruned
        history.append(int((~cur).sum()))
        prev = cur
        if t == 11:
            assert history[-1] < round(0.9 * 2880)
    assert history == sorted(history)
    assert history[11] == round(0.9 * 2880) == history[-1]  # history[i] is step i + 1; 12 is the end step
    assert _zeros(gm, "0") == round(0.5 * 216)


def test_sparsity_dict_with_unknown_key_is_refused():
    with pytest.raises(SurgeryError, match="features.9.weight"):
        surgery.compress(_net(), [MagnitudePrune({"features.9.weight": 0.5})], example_inputs=X)


def test_finalize_gives_plain_model_with_same_function_and_leaves_input_alone():
    net = _net()
    gm = surgery.compress(net, [MagnitudePrune(0.8)], example_inputs=X)
    assert all(p.abs().sum() > 0 for p in net.parameters())  # caller's model untouched
    plain = surgery.finalize(gm)
    assert parametrize.is_parametrized(gm.get_submodule("0"))  # finalize copied
    assert not any(parametrize.is_parametrized(m) for m in plain.modules())
    assert type(plain.get_submodule("3")) is nn.Linear and not surgery.masks(plain)
    assert sorted(dict(plain.named_parameters())) == ["0.bias", "0.weight", "3.bias", "3.weight"]
    assert torch.equal(plain(X), gm(X))
    assert _zeros(plain, "3") == round(0.8 * 2880)
    pickle.loads(pickle.dumps(plain))
    torch.jit.script(plain)


def test_deepcopy_keeps_each_copy_wired_to_its_own_weights():
    gm = surgery.compress(_net(), [MagnitudePrune(0.9, schedule=AGP(0, 4))], example_inputs=X)
    twin = copy.deepcopy(gm)
    for _ in range(4):
        surgery.step(twin)
    assert _zeros(twin, "3") == round(0.9 * 2880) and _zeros(gm, "3") == 0
    m = surgery.masks(twin)["3.parametrizations.weight.0"]
    assert m.__dict__["_source"] is twin.get_submodule("3").parametrizations.weight.original


def test_mask_protocol():
    gm = surgery.compress(_net(), [MagnitudePrune(0.5)], example_inputs=X)
    m = surgery.masks(gm)
    assert len(m) == 2 and all(isinstance(v, WeightMask) for v in m.values())
    assert float(surgery.penalty(gm)) == 0.0


def test_sensitivity_restores_weights_bit_exactly(tmp_path):
    net = _net()
    with torch.no_grad():
        net[3].weight[0, :3] = torch.tensor([-0.0, float("nan"), 1e-30])
    state = {k: v.clone() for k, v in net.state_dict().items()}
    seen = []

    def evaluate(model):
        seen.append(int((model[3].weight == 0).sum()) + int((model[0].weight == 0).sum()))
        return {"out": float(torch.nan_to_num(model(X).detach()).abs().sum()), "zeros": seen[-1]}

    table = surgery.sensitivity(net, evaluate, sparsities=(0.25, 0.5), progress=False)
    for k, v in net.state_dict().items():
        assert torch.equal(v.view(torch.int32) if v.is_floating_point() else v,
                           state[k].view(torch.int32) if v.is_floating_point() else state[k])
    assert [(r["tensor"], r["sparsity"]) for r in table.rows] == [
        ("0.weight", 0.25), ("0.weight", 0.5), ("3.weight", 0.25), ("3.weight", 0.5)]
    assert [r["zeros"] for r in table.rows][2:] == [round(0.25 * 2880), 1440]
    table.to_csv(tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_text().splitlines()[0] == "tensor,sparsity,out,zeros"
    table.plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert "3.weight" in table.to_markdown()


def test_sensitivity_refuses_active_masks():
    gm = surgery.compress(_net(), [MagnitudePrune(0.5)], example_inputs=X)
    with pytest.raises(SurgeryError, match="finalize"):
        surgery.sensitivity(gm, lambda m: {"a": 0.0}, progress=False)
