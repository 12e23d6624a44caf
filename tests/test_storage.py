"""Sizes, encodings, Huffman and the compact archive."""
import json
import math
import os

import pytest
import torch
from torch import nn

import surgery
from passes import MagnitudePrune, WeightShare
from surgery.errors import SurgeryError
from surgery.weights.storage import huffman_lengths, pack_bits, positions_from_codes, relative_codes, unpack_bits


@pytest.mark.parametrize("bits", [1, 3, 5, 8, 13])
def test_pack_unpack_round_trip(bits):
    v = torch.randint(0, 1 << bits, (1237,))
    buf = pack_bits(v, bits)
    assert len(buf) == math.ceil(1237 * bits / 8)
    assert torch.equal(unpack_bits(buf, 1237, bits), v)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_relative_indices_round_trip_with_escapes(bits):
    pos = torch.tensor([0, 1, 2, 40, 41, 300, 301, 5000])
    codes = relative_codes(pos, bits)
    assert int(codes.max()) < (1 << bits)
    assert torch.equal(positions_from_codes(codes, bits), pos)


def test_huffman_lengths_optimal_and_prefix_free():
    counts = [45, 13, 12, 16, 9, 5]
    lengths = huffman_lengths(counts)
    assert sum(c * l for c, l in zip(counts, lengths)) == 224  # the textbook example
    assert sum(2.0 ** -l for l in lengths) == 1.0
    assert huffman_lengths([0, 7, 0]) == [0, 1, 0]


def test_sizes_dense_and_compressed():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    dense = surgery.compressed_size(net)
    assert dense.total("dense") == 4 * (64 * 256 + 256 + 2560 + 10)
    assert dense.total("huffman") == dense.total("dense")  # nothing to gain on random floats
    active = surgery.compress(net, [MagnitudePrune(0.9), WeightShare(4, finetune=True)],
                              example_inputs=torch.randn(2, 64))
    gm = surgery.finalize(active)
    rep = surgery.compressed_size(gm)
    assert surgery.compressed_size(active).tensors == rep.tensors  # measured as baked
    row = {t.name: t for t in rep.tensors}["0.weight"]
    assert row.nonzero == round(0.1 * 16384) and row.distinct == 16
    assert row.dense > row.sparse > row.shared >= row.huffman
    # shared: relative indices + 4-bit cluster indices + a 16-entry float32 codebook
    w = gm.get_submodule("0").weight.reshape(-1)
    entries = len(relative_codes(torch.nonzero(w).reshape(-1), row.index_bits))
    assert row.shared == math.ceil((entries * row.index_bits + row.nonzero * 4) / 8) + 16 * 4
    assert rep.ratio("huffman") > 8
    assert "ratio to dense" in rep.to_markdown()


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 10))
    gm = surgery.compress(net, [MagnitudePrune(0.9), WeightShare(3)], example_inputs=torch.randn(2, 3, 8, 8))
    plain = surgery.finalize(gm)
    with torch.no_grad():
        plain.get_submodule("3").bias[:3] = torch.tensor([-0.0, float("nan"), float("inf")])
    plain.register_buffer("h16", torch.randn(5, 7).half())
    plain.register_buffer("b16", torch.randn(33).bfloat16())
    plain.register_buffer("flags", torch.tensor([True, False, True]))
    plain.register_buffer("empty", torch.zeros(0, 4))
    plain.register_buffer("scalar", torch.tensor(3.5, dtype=torch.float64))
    sparse_dense = torch.zeros(100, 100)
    sparse_dense[::7, ::3] = torch.randn(15, 34)
    plain.register_buffer("sparse_float", sparse_dense)
    return plain


def _bits(t):
    return t.reshape(-1).view(torch.uint8) if t.dtype != torch.bool and t.numel() else t


def test_archive_round_trip_is_bit_exact(tmp_path):
    model = _model()
    path = tmp_path / "m.surg"
    surgery.save(model, path)
    state = surgery.load(path)
    ref = model.state_dict()
    assert list(state) == list(ref)
    for k in ref:
        assert state[k].dtype == ref[k].dtype and state[k].shape == ref[k].shape, k
        assert torch.equal(_bits(state[k].contiguous()), _bits(ref[k].contiguous())), k
    raw = tmp_path / "raw.surg"
    surgery.save(model, raw, compact=False)
    assert os.path.getsize(path) < 0.4 * os.path.getsize(raw)
    header = json.loads(path.read_bytes()[20:20 + int.from_bytes(path.read_bytes()[8:16], "little")])
    encodings = {t["name"]: t["encoding"] for t in header["tensors"]}
    assert encodings["0.weight"] == "shared" and encodings["sparse_float"] == "sparse"
    assert encodings["flags"] == "raw"
    loaded = surgery.load(path, model=_model())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0, equal_nan=True)


def test_archive_holds_no_pickle(tmp_path):
    path = tmp_path / "m.surg"
    surgery.save(_model(), path)
    data = path.read_bytes()
    assert data[:8] == b"SURGERY\x01" and data[-8:] == b"\x01YREGRUS"
    assert b"\x80\x02" not in data[:200] and b"torch._utils" not in data


@pytest.mark.parametrize("cut", [4, 15, 40, -9, -1])
def test_truncated_archive_is_refused(tmp_path, cut):
    path = tmp_path / "m.surg"
    surgery.save(_model(), path)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(SurgeryError, match=r"m\.surg.*(truncated|too short)"):
        surgery.load(path)


@pytest.mark.parametrize("where", ["header", "data", "magic"])
def test_corrupted_archive_is_refused(tmp_path, where):
    path = tmp_path / "m.surg"
    surgery.save(_model(), path)
    data = bytearray(path.read_bytes())
    hlen = int.from_bytes(data[8:16], "little")
    at = {"header": 20 + hlen // 2, "data": 20 + hlen + 10, "magic": 2}[where]
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(SurgeryError, match=r"m\.surg: (corrupt|not a surgery)"):
        surgery.load(path)


def test_archive_that_does_not_fit_the_model(tmp_path):
    path = tmp_path / "m.surg"
    surgery.save(nn.Linear(3, 4), path)
    with pytest.raises(SurgeryError, match="does not fit"):
        surgery.load(path, model=nn.Linear(3, 5))
    with pytest.raises(SurgeryError, match="cannot read"):
        surgery.load(tmp_path / "missing.surg")
