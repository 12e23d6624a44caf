"""Capture what users actually bring (issue 15): keyword example inputs, and outputs that keep
their type.

Example inputs may be a dict of keyword inputs (a tokenizer's output) everywhere they are taken:
capture, compress and its passes (Shrink), export, activation memory and sparsity, MAC counts,
summary and the verify helpers. The dict's keys become the captured module's arguments. What
the model returns (a namedtuple, a dataclass, a dict, nested tuples, a Hugging Face ModelOutput)
the captured module returns too, with the same type and values, through the shape run as well.
"""
from __future__ import annotations

import collections
import dataclasses
import inspect
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgery
from passes import ChannelPrune, CompressActivations, Identity, Shrink, Sparsifier
from surgery import TraceFailure
from surgery.calling import call
from surgery.io import count_macs
from surgery.verify import max_abs_diff, max_rel_diff, run_eval


class Masked(nn.Module):
    """A forward with a positional input, an optional mask and a keyword-only scale."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x, mask=None, *, scale=1.0):
        y = F.relu(self.bn(self.conv(x))) * scale
        if mask is not None:
            y = y * mask
        return self.head(y)


class Keywords(nn.Module):
    """A **kwargs forward that hands its keywords on, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x, **kwargs):
        h = self.embed(x)
        if "gate" in kwargs:  # which keys there are is known when tracing: no proxy decides it
            h = h * kwargs["gate"]
        return self._head(h, **kwargs)

    def _head(self, h, gate=None, bias=None):
        return self.out(h) + (0.0 if bias is None else bias)


def _placeholders(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]


X = torch.randn(2, 3, 8, 8)


# ------------------------------------------------------------------------------ keyword inputs
def test_keyword_inputs_become_the_captured_modules_arguments():
    model = Masked().eval()
    inputs = {"x": X, "scale": 2.0}
    gm = surgery.capture(model, inputs)
    assert torch.equal(gm(**inputs), model(**inputs))
    # supplied arguments first, in the forward's order, then the rest at their defaults (guarded)
    assert _placeholders(gm) == ["x", "scale", "mask"]
    assert gm.meta["surgery"]["constants"] == {"mask": None}
    assert torch.equal(gm(X, 3.0), model(X, scale=3.0))  # positionally too; scale stays an input
    with pytest.raises(AssertionError, match="mask was traced as None"):
        gm(X, 2.0, torch.ones(1, 16, 1, 1))
    # a supplied tensor mask stays an input as well; the order of the dict's keys does not matter
    mask = torch.rand(1, 16, 1, 1)
    gm = surgery.capture(model, {"mask": mask, "x": X})
    assert _placeholders(gm) == ["x", "mask", "scale"]
    other = torch.rand(1, 16, 1, 1)
    assert torch.equal(gm(x=X, mask=other), model(X, other))
    assert gm.meta["surgery"]["constants"] == {"scale": 1.0}


def test_a_kwargs_forward_takes_the_examples_keys_as_arguments():
    model = Keywords().eval()
    x, gate, bias = torch.randn(5, 4), torch.rand(8), torch.rand(3)
    inputs = {"x": x, "gate": gate, "bias": bias}
    gm = surgery.capture(model, inputs)
    assert _placeholders(gm) == ["x", "gate", "bias"]
    assert torch.equal(gm(**inputs), model(**inputs))
    assert torch.equal(gm(x, gate, bias), model(**inputs))  # in the example's order
    other = {"x": torch.randn(5, 4), "gate": torch.rand(8), "bias": torch.rand(3)}
    assert torch.equal(gm(**other), model(**other))
    with pytest.raises(TypeError):
        gm(x=x, gate=gate, bias=bias, extra=1)
    # positional inputs: **kwargs receives nothing, and the module takes nothing else
    gm = surgery.capture(model, (x,))
    assert _placeholders(gm) == ["x"] and torch.equal(gm(x), model(x))
    # concrete_args may name keys for **kwargs: traced as constants, like any argument
    gm = surgery.capture(model, {"x": x}, concrete_args={"bias": None})
    assert gm.meta["surgery"]["constants"] == {"bias": None} and torch.equal(gm(x), model(x))


def test_keys_the_forward_does_not_take_raise_naming_them():
    with pytest.raises(TraceFailure, match=r"key\(s\) 'scal'.*Masked.forward") as info:
        surgery.capture(Masked(), {"x": X, "scal": 2.0})
    assert type(info.value) is TraceFailure
    with pytest.raises(TraceFailure, match=r"needs argument 'x'.*keys 'scale'"):
        surgery.capture(Masked(), {"scale": 2.0})
    with pytest.raises(TraceFailure, match="not a valid argument name"):
        surgery.capture(Keywords(), {"x": torch.randn(5, 4), "not a name": 1.0})


def test_compress_chain_prune_and_shrink_with_keyword_inputs_is_exact():
    model = Masked().eval()
    inputs = {"x": X, "scale": 2.0}
    masked = surgery.compress(model, [ChannelPrune(ratio=0.5)], example_inputs=inputs)
    small = surgery.compress(model, [ChannelPrune(ratio=0.5), Shrink()], example_inputs=inputs)
    assert small.get_submodule("conv").out_channels == 8  # Shrink ran on the keyword inputs
    assert max_abs_diff(run_eval(masked, inputs), run_eval(small, inputs)) < 1e-5
    # Shrink again on a captured module, with the same dict
    again = surgery.compress(masked, [Shrink()], example_inputs=inputs)
    torch.testing.assert_close(run_eval(again, inputs), run_eval(masked, inputs), rtol=1e-5, atol=1e-5)
    assert surgery.shrink(masked, inputs).get_submodule("conv").out_channels == 8


def test_export_takes_keyword_inputs(tmp_path):
    model = Masked().eval()
    inputs = {"x": X, "scale": 2.0}
    small = surgery.compress(model, [ChannelPrune(ratio=0.5), Shrink()], example_inputs=inputs)
    path = surgery.export(small, tmp_path / "small.pt", example_inputs=inputs)
    loaded = torch.jit.load(str(path))
    torch.testing.assert_close(loaded(**inputs), run_eval(small, inputs))  # scripted: the names and the float stay
    # an eager model traced with keyword tensors (torch.jit.trace's example_kwarg_inputs)
    path = surgery.export(model, tmp_path / "eager.pt", example_inputs={"x": X}, method="trace")
    torch.testing.assert_close(torch.jit.load(str(path))(x=X), run_eval(model, {"x": X}))
    # where TorchScript cannot take the keywords, the failure says why
    with pytest.raises(surgery.ExportFailure, match="keyword inputs: torch.jit.trace"):
        surgery.export(Keywords().eval(), tmp_path / "kw.pt", example_inputs={"x": torch.randn(5, 4), "gate": 1.0})
    assert not (tmp_path / "kw.pt").exists()


def test_activation_memory_sparsity_macs_and_summary_take_keyword_inputs():
    model = Masked().eval()
    inputs = {"x": X, "scale": 2.0}
    gm = surgery.compress(model, [CompressActivations("int8")], example_inputs=inputs)
    by_name = surgery.activation_memory(gm, inputs)
    assert 0 < by_name.compressed_bytes < by_name.baseline_bytes
    by_position = surgery.activation_memory(gm, (X, 2.0))
    assert (by_name.baseline_bytes, by_name.compressed_bytes) == (by_position.baseline_bytes,
                                                                  by_position.compressed_bytes)
    sparse = surgery.compress(model, [Sparsifier(select="conv", eps=0.3)], example_inputs=inputs)
    assert set(surgery.activation_sparsity(sparse, inputs)) == set(surgery.activation_sparsity(sparse, (X, 2.0)))
    assert count_macs(model, inputs) == count_macs(model, (X,))
    assert sum(count_macs(gm, inputs).values()) == sum(count_macs(model, (X,)).values())  # names gain a region prefix
    assert surgery.summary(model, inputs=inputs).totals["macs"] == sum(count_macs(model, (X,)).values())
    groups = surgery.summary(surgery.capture(model, inputs), inputs=inputs, groups=True).groups
    assert groups is not None and len(groups) >= 1


def test_one_helper_calls_a_model_on_either_kind_of_inputs():
    model = Masked().eval()
    assert torch.equal(call(model, {"x": X, "scale": 2.0}), model(X, scale=2.0))
    assert torch.equal(call(model, (X,)), model(X)) and torch.equal(call(model, X), model(X))
    # a dict none of whose keys the forward takes is one positional input, as it always was
    batch_model = nn.ModuleDict({"lin": nn.Linear(4, 2)})
    batch_model.forward = lambda batch: batch_model["lin"](batch["a"])
    batch = {"a": torch.randn(3, 4)}
    assert torch.equal(call(batch_model, batch), batch_model["lin"](batch["a"]))


# -------------------------------------------------------------------------------- output types
Pair = collections.namedtuple("Pair", "logits features")


@dataclasses.dataclass
class Result:
    logits: torch.Tensor
    features: torch.Tensor


def _build(kind: str, logits: torch.Tensor, features: torch.Tensor):
    if kind == "namedtuple":
        return Pair(logits, features)
    if kind == "dataclass":
        return Result(logits, features)
    if kind == "dict":
        return {"logits": logits, "more": {"features": features}}
    if kind == "nested":
        return (logits, [features, (logits,)])
    from transformers.modeling_outputs import BaseModelOutput
    return BaseModelOutput(last_hidden_state=logits, hidden_states=(features, logits))


class Typed(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x, attention_mask=None):
        h = torch.relu(self.lin(x))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return _build(self.kind, self.head(h), h)


KINDS = ["namedtuple", "dataclass", "dict", "nested", "model_output"]


def _same(a, b) -> bool:
    return type(a) is type(b) and max_abs_diff(a, b) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_the_captured_module_returns_what_the_model_returns(kind):
    if kind == "model_output":
        pytest.importorskip("transformers")
    model = Typed(kind).eval()
    inputs = {"x": torch.randn(3, 5, 4), "attention_mask": torch.ones(3, 5)}
    ref = model(**inputs)
    gm = surgery.capture(model, inputs)
    out = gm(**inputs)
    assert type(out) is type(ref)
    assert _same(out, ref)
    assert _same(gm(*inputs.values()), ref)
    # the shape run returns the same type (it used to turn containers into plain dicts and tuples)
    assert _same(surgery.ShapeProp(gm).propagate(**inputs), ref)
    # through compress, a pass and its shape run, and a pickle round trip (which traces the code again)
    cm = surgery.compress(model, [Identity(select=nn.Linear)], example_inputs=inputs)
    assert _same(cm(**inputs), ref)
    assert _same(pickle.loads(pickle.dumps(gm))(**inputs), ref)


def test_model_output_fields_work_on_the_captured_module():
    transformers = pytest.importorskip("transformers")
    model = Typed("model_output").eval()
    x = torch.randn(3, 5, 4)
    gm = surgery.capture(model, (x,))
    out = gm(x)
    assert isinstance(out, transformers.modeling_outputs.BaseModelOutput)
    assert torch.equal(out.last_hidden_state, model(x).last_hidden_state) and torch.equal(out[0], out.last_hidden_state)
    assert out.attentions is None and list(out.keys()) == ["last_hidden_state", "hidden_states"]


class Eager(nn.Module):
    """Kept opaque (a leaf): its namedtuple and ModelOutput reach traced code as they are."""

    def forward(self, x):
        from transformers.modeling_outputs import BaseModelOutput
        return Pair(x * 2, [x, x + 1]), BaseModelOutput(last_hidden_state=x - 1)


class ReadsFields(nn.Module):
    def __init__(self):
        super().__init__()
        self.eager = Eager()

    def forward(self, x):
        pair, out = self.eager(x)
        return pair.logits + pair.features[1] + out.last_hidden_state + out[0]


def test_the_shape_run_keeps_the_types_opaque_modules_return():
    pytest.importorskip("transformers")
    model = ReadsFields().eval()
    x = torch.randn(2, 4)
    gm = surgery.capture(model, {"x": x}, leaf_modules=[Eager])  # the shape run reads the fields
    assert torch.equal(gm(x=x), model(x))
    assert gm.graph.find_nodes(op="output")[0].meta["shape"] == (2, 4)


def test_max_rel_diff_compares_dataclass_outputs_field_by_field():
    a = Result(torch.ones(2), torch.zeros(3))
    b = Result(torch.ones(2) * 1.5, torch.zeros(3))
    assert max_rel_diff(a, b) == pytest.approx(0.5) and max_abs_diff(a, a) == 0


# ----------------------------------------------------------------------- a real Hugging Face model
def test_bert_from_a_config_captures_exactly_with_keyword_inputs():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100)
    model = transformers.BertModel(config).eval()
    assert any(p.kind is p.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    gm = surgery.capture(model, {"input_ids": ids, "attention_mask": mask})
    assert gm.meta["surgery"]["shell"] is False and gm.meta["surgery"]["opaque"] == {}
    fresh = {"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    fresh["attention_mask"][0, 3:] = 0
    with torch.no_grad():
        out, ref = gm(**fresh), model(**fresh)
    assert type(out) is type(ref)  # BaseModelOutputWithPoolingAndCrossAttentions
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(out.pooler_output, ref.pooler_output)
