"""Hugging Face transformers, built from small configs (random weights, nothing downloaded):
plain ``surgery.capture(model, example_inputs={...})`` traces them whole, returns their own
output types, and stays exact at other batch sizes and lengths."""
import sys
from pathlib import Path

import pytest
import torch

import surgery

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _hf_models import build_hf, example_inputs, output_tensors  # noqa: E402

# one encoder, one decoder LM with grouped-query attention, one encoder-decoder, one vision
# transformer, one model with tied input/output embeddings
CASES = ["bert", "llama", "t5", "vit", "gpt2"]


@pytest.mark.parametrize("name", CASES)
def test_hf_models_capture_whole_and_exact_at_other_sizes(name):
    model, x = build_hf(name)
    gm = surgery.capture(model, example_inputs=x)
    assert gm.meta["surgery"]["opaque"] == {}
    for batch, length in [(2, 9), (3, 5)]:
        fresh = example_inputs(name, seed=7, batch=batch, length=length)
        with torch.no_grad():
            got, want = gm(**fresh), model(**fresh)
        assert type(got) is type(want)
        a, b = output_tensors(got), output_tensors(want)
        assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))


def test_a_decoder_lm_keeps_its_tied_embeddings_and_names_its_guards():
    model, x = build_hf("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    gm = surgery.capture(model, example_inputs=x)
    assert gm.lm_head.weight is gm.transformer.wte.weight
    assert all(" at " in g and ".py:" in g for g in gm.meta["surgery"]["guards"])
