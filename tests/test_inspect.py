"""surgery.io.inspect.summary and surgery.io.files.load_model_file, in process."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import surgery
from surgery.errors import BadModelFile, SurgeryError, UnsafeFile
from surgery.io.files import load_model_file
from surgery.io.inspect import parse_shapes, summary

from helpers import n_params


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)            # 1x8x8 -> 4x6x6
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def test_rows_totals_and_macs_are_exact():
    net = Small()
    s = summary(net, input_shape=(2, 1, 8, 8))
    assert [r.name for r in s.rows] == ["conv", "bn", "fc"]
    conv, bn, fc = s.rows
    assert (conv.type, conv.in_, conv.out, conv.params) == ("Conv2d", 1, 4, 40)
    assert (bn.in_, bn.out, bn.params) == (4, 4, 8)
    assert (fc.in_, fc.out, fc.params) == (144, 10, 1450)
    # batch 2: conv 2*4*6*6 outputs x 9 taps; linear 2*10 outputs x 144 inputs
    assert conv.macs == 2 * 144 * 9 and fc.macs == 2 * 10 * 144 and bn.macs == 0
    assert s.totals["params"] == n_params(net) == 1498
    assert s.totals["macs"] == conv.macs + fc.macs
    assert s.totals["buffers"] == 4 + 4 + 1


def test_sparsity_counts_zeros_of_the_weights():
    net = Small()
    with torch.no_grad():
        net.fc.weight[:, :72] = 0
        net.fc.bias.fill_(0)  # zero biases and a fresh BatchNorm's zero shift are not sparsity
    s = summary(net)
    fc = next(r for r in s.rows if r.name == "fc")
    assert fc.zeros == 720 and fc.sparsity == pytest.approx(720 / 1440)
    bn = next(r for r in s.rows if r.name == "bn")
    assert bn.params == 2 * bn.out and bn.zeros == 0 and bn.sparsity == 0 and bn.weights == 0
    conv_zeros = int((net.conv.weight == 0).sum())
    assert s.totals["zeros"] == 720 + conv_zeros
    assert s.totals["sparsity"] == pytest.approx((720 + conv_zeros) / (1440 + net.conv.weight.numel()), abs=1e-6)
    assert s.totals["macs"] is None
    bn_line = next(line for line in str(s).splitlines() if line.startswith("bn "))
    assert bn_line.split() == ["bn", "BatchNorm2d", "4", "4", "8"]  # no sparsity shown for a layer without weights


def test_torchscript_matches_eager_and_ops_outside_layers_are_kept():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(8, 8)

        def forward(self, x):
            q = self.q(x)
            return q @ q.transpose(-1, -2)       # reads no parameter: credited to (other)

    net = Attn()
    eager = summary(net, input_shape=(1, 5, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = summary(torch.jit.script(net), input_shape=(1, 5, 8))
    assert ts.kind == "torchscript"
    for s in (eager, ts):
        assert s.totals["params"] == 72
        assert {r.name: r.macs for r in s.rows} == {"q": 5 * 8 * 8, "(other)": 5 * 5 * 8}
        assert s.totals["macs"] == 5 * 8 * 8 + 5 * 5 * 8


def test_frozen_torchscript_counts_its_constants_and_macs(tmp_path):
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        net[0].weight[:3] = 0
    path = surgery.export(net, tmp_path / "frozen.pt", example_inputs=(torch.randn(2, 8),), freeze=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = summary(load_model_file(path).model, input_shape=(2, 8))
    assert s.totals["params"] == n_params(net) == 8 * 16 + 16 + 16 * 4 + 4
    assert s.totals["zeros"] == 3 * 8
    assert s.totals["macs"] == 2 * (8 * 16 + 16 * 4)
    assert any("frozen TorchScript" in n for n in s.notes)


def test_mask_rows_show_kept_over_total():
    from passes import Identity
    gm = surgery.compress(Small(), passes=[Identity(select=nn.Conv2d)], example_inputs=(torch.randn(1, 1, 8, 8),))
    s = summary(gm, input_shape="1,1,8,8")
    masks = [r for r in s.rows if r.units is not None]
    assert [(r.type, r.kept, r.units) for r in masks] == [("OnesMask", 4, 4)]
    assert (s.totals["masks"], s.totals["mask_kept"], s.totals["mask_units"]) == (1, 4, 4)
    assert "4/4" in str(s)


def test_state_dict_summary_guesses_types_and_skips_buffers():
    net = Small()
    s = summary(net.state_dict())
    assert s.kind == "state_dict"
    assert {r.name: r.type for r in s.rows} == {"conv": "Conv2d?", "bn": "BatchNorm?", "fc": "Linear?"}
    assert s.totals["params"] == n_params(net) and s.totals["buffers"] == 9
    assert any("guessed" in n for n in s.notes)


def test_json_round_trip():
    net = Small()
    doc = json.loads(summary(net, "1,1,8,8").to_json())
    assert doc["totals"]["params"] == sum(r["params"] for r in doc["rows"]) == n_params(net)
    assert doc["input_shapes"] == [[1, 1, 8, 8]]
    assert {"name", "type", "in", "out", "params", "sparsity", "kept", "units", "macs"} <= set(doc["rows"][0])


def test_parse_shapes():
    assert parse_shapes("1,3,224,224") == [(1, 3, 224, 224)]
    assert parse_shapes("1,3,8,8; 1,4") == [(1, 3, 8, 8), (1, 4)]
    assert parse_shapes((2, 4)) == [(2, 4)]
    for bad in ("1,x,3", "1,0,3", ""):
        with pytest.raises(SurgeryError, match="bad input shape"):
            parse_shapes(bad)


def test_bad_input_shape_is_a_surgery_error():
    with pytest.raises(SurgeryError, match=r"input shape \(1, 3, 8, 8\) failed"):
        summary(Small(), "1,3,8,8")


def test_groups_show_members_and_frozen_reasons():
    s = summary(Small(), "1,1,8,8", groups=True)
    by_producer = {tuple(g["producers"]): g for g in s.groups}
    conv = by_producer[("conv",)]
    assert conv["size"] == 4 and conv["frozen"] is None and conv["readers"] == ["fc"] and "bn" in conv["locals"]
    out = by_producer[("fc",)]
    assert out["size"] == 10 and "output" in out["frozen"]        # the model's own output never shrinks
    table = str(s)
    assert "channel groups: 2 (1 frozen)" in table and f"FROZEN: {out['frozen']}" in table
    assert json.loads(s.to_json())["groups"] == s.groups
    assert any("need an input shape" in n for n in summary(Small(), groups=True).notes)


def test_load_model_file_kinds(tmp_path):
    net = Small()
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    torch.save({"epoch": 3, "state_dict": net.state_dict()}, tmp_path / "ckpt.pt")
    torch.save(net, tmp_path / "module.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(net), str(tmp_path / "ts.pt"))
    assert load_model_file(tmp_path / "sd.pt").kind == "state_dict"
    ck = load_model_file(tmp_path / "ckpt.pt")
    assert ck.kind == "state_dict" and "state_dict" in ck.note
    assert load_model_file(tmp_path / "ts.pt").kind == "torchscript"
    with pytest.raises(UnsafeFile, match="--trust"):
        load_model_file(tmp_path / "module.pt")
    loaded = load_model_file(tmp_path / "module.pt", trust=True)
    assert loaded.kind == "module" and n_params(loaded.model) == n_params(net)


def test_load_model_file_refuses_bad_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not a model\n")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    cases = {"missing.pt": "no such file", "empty.pt": "empty file", "text.pt": "not a model file",
             "tensor.pt": "single tensor", ".": "is a directory"}
    for name, message in cases.items():
        with pytest.raises(BadModelFile, match=message):
            load_model_file(tmp_path / name)


def test_compact_archive_is_recognised_and_damage_reported(tmp_path):
    net = Small()
    surgery.save(net, tmp_path / "a.surg", compact=True)
    loaded = load_model_file(tmp_path / "a.surg")
    assert loaded.kind == "compact" and summary(loaded.model).totals["params"] == n_params(net)
    data = (tmp_path / "a.surg").read_bytes()
    (tmp_path / "cut.surg").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadModelFile, match="cut.surg: truncated or corrupt compact archive"):
        load_model_file(tmp_path / "cut.surg")
