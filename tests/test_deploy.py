"""Export to .pt2 (torch.export) and .onnx (ONNX Runtime), reloaded and verified like TorchScript."""
from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import surgery
from surgery.io.deployed import read_onnx, read_pt2
from surgery.verify import max_rel_diff

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).flatten(1))


class Block(nn.Module):
    """Token ids in (keyword inputs, with a padding mask), a pre-norm attention block and an MLP."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln = nn.Embedding(50, 16), nn.LayerNorm(16)
        self.qkv, self.o = nn.Linear(16, 48), nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.emb(input_ids)
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln(x)).reshape(b, n, 3, 4, 4).permute(2, 0, 3, 1, 4)
        keep = attention_mask[:, None, None, :].bool()
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(x)


class Heads(nn.Module):
    """A dict of outputs, one of them a tuple."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> dict[str, object]:
        return {"logits": self.a(x), "aux": (self.b(x), x.sum(-1))}


def _cases():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return [("cnn", CNN().eval(), (torch.randn(1, 3, 16, 16),)),
            ("block", Block().eval(), {"input_ids": ids, "attention_mask": mask}),
            ("heads", Heads().eval(), (torch.randn(3, 4),))]


def _grown(inputs, batch):
    if isinstance(inputs, dict):
        return {k: v[torch.arange(batch) % len(v)] for k, v in inputs.items()}
    return tuple(v[torch.arange(batch) % len(v)] for v in inputs)


def _leaves(value) -> list[Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, Tensor)]


@pytest.mark.parametrize("name,model,inputs", _cases(), ids=[c[0] for c in _cases()])
def test_pt2_and_onnx_files_reproduce_the_model_at_another_batch_size(tmp_path, name, model, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation or fallback warning reaches the user
        pt2 = surgery.export(model, tmp_path / f"{name}.pt2", inputs)
        onnx_path = surgery.export(model, tmp_path / f"{name}.onnx", inputs)
    other = _grown(inputs, 5)  # not the batch of the example, nor the one exported on
    with torch.no_grad():
        ref = model(**other) if isinstance(other, dict) else model(*other)
    program = torch.export.load(str(pt2)).module()  # plain torch
    with torch.no_grad():
        got = program(**other) if isinstance(other, dict) else program(*other)
    assert max_rel_diff(ref, got) < 1e-5
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])  # plain ONNX Runtime
    feed = dict(zip([i.name for i in session.get_inputs()],
                    [v.numpy() for v in (other.values() if isinstance(other, dict) else other)]))
    outs = session.run(None, feed)
    want = _leaves(ref)
    assert len(outs) == len(want)
    for o, w in zip(outs, want):
        np.testing.assert_allclose(o, w.numpy(), rtol=1e-5, atol=1e-5 * float(w.abs().max()))
    if name == "block":  # the token inputs' sequence axis is dynamic too
        assert [d.dim_param != "" for d in session.get_inputs()[0].shape and onnx.load(str(onnx_path)).graph.input[0]
                .type.tensor_type.shape.dim] == [True, True]


def test_a_tampered_onnx_file_fails_verification(tmp_path):
    model = CNN().eval()
    x = (torch.randn(2, 3, 16, 16),)
    path = surgery.export(model, tmp_path / "cnn.onnx", x)
    assert surgery.verify_export(path, model, x) < 1e-5
    m = onnx.load(str(path))
    weight = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the largest weight: one entry changed
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(m, str(path))
    with pytest.raises(surgery.ExportMismatch, match=r"cnn.onnx: the reloaded file differs from the model at batch 2"):
        surgery.verify_export(path, model, x)


def test_the_torchscript_based_onnx_exporter_takes_over_where_dynamo_fails(tmp_path, monkeypatch):
    """HF T5 and Swin fail in the dynamo exporter of torch 2.14 (a reshape decomposed into a view
    of a transposed tensor); here that failure is simulated on the token block."""
    real = torch.onnx.export
    calls = []

    def export(*args, dynamo=True, **kwargs):
        calls.append(dynamo)
        if dynamo:
            raise RuntimeError("Failed to decompose the FX graph for ONNX compatibility")
        return real(*args, dynamo=False, **kwargs)
    monkeypatch.setattr(torch.onnx, "export", export)
    inputs = {"input_ids": torch.randint(0, 50, (1, 7)), "attention_mask": torch.ones(1, 7, dtype=torch.long)}
    model = surgery.capture(Block().eval(), inputs)  # a GraphModule, whose .graph that exporter misreads
    path = surgery.export(model, tmp_path / "block.onnx", inputs)
    assert calls == [True, True, True, True, False]  # dynamic, static, both unoptimised, then the TorchScript-based one
    grown = {"input_ids": torch.randint(0, 50, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    with torch.no_grad():
        want = model(**grown)
    got = surgery.load_deployed(path)(**grown)[0]
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)  # batch and sequence axes dynamic
    assert surgery.verify_export(path, model, inputs) < 1e-5


def test_the_onnx_fallback_keeps_the_batch_a_graph_fixes(tmp_path, monkeypatch):
    """A graph traced at batch 2 with the batch written into a reshape (timm's BoTNet, HaloNet
    after concrete tracing): the fallback exporter declares no batch axis it cannot honour."""
    real = torch.onnx.export

    def export(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("Failed to export the model with torch.export")
        return real(*args, dynamo=False, **kwargs)
    monkeypatch.setattr(torch.onnx, "export", export)
    x, model = (torch.randn(2, 3, 4),), FixedBatch().eval()
    with pytest.warns(UserWarning, match=r"FixedBatch's graph fixes the batch size, so the onnx file takes inputs "
                                         r"of batch 2 only"):
        path = surgery.export(model, tmp_path / "fixed.onnx", x)
    assert surgery.verify_export(path, model, x) < 1e-6


def test_an_onnx_export_failure_names_both_exporters(tmp_path, monkeypatch):
    def export(*args, dynamo=True, **kwargs):
        raise RuntimeError("dynamo says no" if dynamo else "torchscript says no")
    monkeypatch.setattr(torch.onnx, "export", export)
    with pytest.raises(surgery.ExportFailure, match=r"cnn.onnx: torch.onnx.export cannot export CNN: RuntimeError: "
                                                    r"dynamo says no \(and the TorchScript-based exporter: "
                                                    r"RuntimeError: torchscript says no\)"):
        surgery.export(CNN().eval(), tmp_path / "cnn.onnx", (torch.randn(1, 3, 16, 16),))


def test_missing_onnxruntime_names_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(surgery.ExportFailure, match=r"ONNX needs onnxruntime, which is not installed: "
                                                    r"pip install 'surgery\[export\]'"):
        surgery.export(CNN().eval(), tmp_path / "cnn.onnx", (torch.randn(1, 3, 16, 16),))
    assert not (tmp_path / "cnn.onnx").exists()


def test_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(surgery.ExportFailure, match=r"cannot tell the format from the suffix '.bin'"):
        surgery.export(CNN().eval(), tmp_path / "cnn.bin", (torch.randn(1, 3, 16, 16),))


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.reshape(2, 12))  # the graph fixes the batch at 2


def test_a_graph_that_fixes_the_batch_is_exported_with_a_warning(tmp_path):
    x, model = (torch.randn(2, 3, 4),), FixedBatch().eval()
    with pytest.warns(UserWarning, match=r"FixedBatch's graph fixes the batch size, so the pt2 file takes inputs "
                                         r"of batch 2 only"):
        path = surgery.export(model, tmp_path / "fixed.pt2", x)
    assert surgery.verify_export(path, model, x) < 1e-6
    with pytest.raises(Exception):  # the program says so itself
        torch.export.load(str(path)).module()(torch.randn(3, 3, 4))


def test_files_are_read_without_unpickling(tmp_path, monkeypatch):
    model = CNN().eval()
    x = (torch.randn(1, 3, 16, 16),)
    pt2 = surgery.export(model, tmp_path / "cnn.pt2", x)
    onnx_path = surgery.export(model, tmp_path / "cnn.onnx", x)
    monkeypatch.setattr("pickle.Unpickler", None)  # any unpickling would fail
    monkeypatch.setattr(torch, "load", None)
    n_params = sum(p.numel() for p in model.parameters())
    a, b = read_pt2(pt2), read_onnx(onnx_path)
    assert a.params == n_params and a.buffers == 8 + 8 + 1  # BN's running mean, var and batch count
    assert a.ops["aten.conv2d.default"] == 2
    assert a.inputs[0][1][1:] == [3, 16, 16] and isinstance(a.inputs[0][1][0], str)  # a dynamic batch
    assert a.outputs[0][1][1:] == [5]
    assert b.params == n_params - 16 and "BatchNormalization" not in b.ops  # BatchNorm folded into the conv
    assert b.ops.get("Conv") == 2 and b.inputs[0][1][1:] == [3, 16, 16] and isinstance(b.inputs[0][1][0], str)
    assert "parameters" in a.table() and "Conv x2" in b.table()


def test_an_onnx_file_off_by_more_than_rounding_says_which_tol_would_take_it(tmp_path, monkeypatch):
    from surgery.io import deploy
    monkeypatch.setattr(deploy, "_compare", lambda ref, out, flat=False: 3e-5)  # every file: 3e-5 off
    with pytest.raises(surgery.ExportFailure, match=r"one file ran and matched the model to a relative error of "
                                                    r"3e-05, above tol=1e-05 and more than float32 rounding "
                                                    r"explains: .* pass a larger tol"):
        surgery.export(CNN().eval(), tmp_path / "cnn.onnx", (torch.randn(1, 3, 16, 16),))
    assert not (tmp_path / "cnn.onnx").exists()


class Casts(nn.Module):
    """A model whose code casts to float32 itself, as norms in transformers do."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x).float()
        return (h * torch.ones(4)).to(torch.float32) + h.to(dtype=torch.float32)


def test_the_float64_reference_promotes_the_casts_a_captured_graph_keeps():
    from torch.nn import functional as F

    from surgery.verify import float64_outputs
    model, x = Casts(), torch.randn(3, 6)
    gm = surgery.capture(model, (x,))
    exact = float64_outputs(gm, (x,))
    lin = model.lin
    assert exact.dtype == torch.float64
    assert torch.equal(exact, 2 * F.linear(x.double(), lin.weight.double(), lin.bias.double()))
    assert gm.lin.weight.dtype == torch.float32 and torch.get_default_dtype() == torch.float32  # nothing changed
    assert float64_outputs(model, (x,)).dtype == torch.float32  # an eager model's casts stay: no better reference


def _runner_returning(monkeypatch, outputs):
    """verify_export reads a 'file' that returns `outputs(x)` (a list of tensors, as ONNX Runtime does)."""
    from surgery.io import deploy
    monkeypatch.setattr(deploy, "load_deployed", lambda path, kind: lambda x: [outputs(x)])


def test_a_file_off_by_float32_rounding_only_passes_and_one_off_by_more_fails(tmp_path, monkeypatch):
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)]).eval()
    x = (torch.randn(4, 64),)
    with torch.no_grad():
        ref = model(*x)
        exact = model.double()(x[0].double())
    model.float()
    # another runtime's rounding: the float64 result rounded to float32, which misses a tol of 1e-9
    assert max_rel_diff(ref, exact.float()) > 1e-9
    _runner_returning(monkeypatch, lambda x: exact.float()[: len(x)])
    assert surgery.verify_export(tmp_path / "m.onnx", model, x, tol=1e-9) > 1e-9
    _runner_returning(monkeypatch, lambda x: model(x) * (1 + 1e-5))  # off by more than rounding
    with pytest.raises(surgery.ExportMismatch,
                       match=r"m.onnx: the reloaded file differs from the model at batch 4 \(max rel. error 1e-05 > "
                             r"1e-09; from the model run in float64 it is [0-9.e-]+ off, the model's own float32 run "
                             r"[0-9.e-]+\)"):
        surgery.verify_export(tmp_path / "m.onnx", model, x, tol=1e-9)
