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


class _Boxes(torch.nn.Module):
    """What a user who runs only the detections keeps of a DETR: its logits and boxes, not the
    decoder's stream (``last_hidden_state``), whose width the model's own output fixes."""

    def __init__(self, detr):
        super().__init__()
        self.detr = detr

    def forward(self, pixel_values):
        out = self.detr(pixel_values=pixel_values)
        return out.logits, out.pred_boxes


@pytest.mark.parametrize("name, kept", [("detr", 29990), ("conditional_detr", 43175), ("deformable_detr", 39247)])
def test_detection_transformers_capture_whole_and_shrink_exactly(name, kept):
    from passes import ChannelPrune, Shrink
    model, x = build_hf(name)
    gm = surgery.capture(model, example_inputs=x)
    assert gm.meta["surgery"]["opaque"] == {}  # item assignment and torch._check in the graph
    small = surgery.compress(model, [ChannelPrune(0.5), Shrink()], x)
    assert sum(p.numel() for p in small.parameters()) == kept  # of 74698, 87403, 79203
    # the frozen BatchNorms' buffers go with their convs (the backbone was whole before)
    backbone = [k for k, v in small.named_buffers() if k.endswith("running_var") and v.numel() < 16]
    assert backbone
    fresh = example_inputs(name, seed=3)
    masked = surgery.compress(model, [ChannelPrune(0.5)], x)
    for a, b in zip(output_tensors(small(**fresh)), output_tensors(masked(**fresh))):
        assert torch.allclose(a, b, atol=1e-5)


def test_a_detr_returning_only_its_boxes_loses_its_decoder_stream_too():
    from passes import ChannelPrune, Shrink
    model, x = build_hf("detr")
    px = x["pixel_values"]
    whole = surgery.compress(model, [ChannelPrune(0.5), Shrink()], x)
    boxes = surgery.compress(_Boxes(model), [ChannelPrune(0.5), Shrink()], (px,))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (n(whole), n(boxes)) == (29990, 24038)
    assert boxes.get_submodule("detr.model.query_position_embeddings").weight.shape == (10, 16)
    assert whole.get_submodule("model.query_position_embeddings").weight.shape == (10, 32)


def test_a_detr_on_timm_s_resnet_as_its_checkpoints_load_prunes_its_backbone():
    """facebook/detr-resnet-50 loads its backbone from timm, each BatchNorm replaced by
    DetrFrozenBatchNorm2d; built here from a config, the backbone a resnet18 without weights."""
    pytest.importorskip("timm")
    import transformers
    from passes import ChannelPrune, Shrink
    config = transformers.DetrConfig(use_timm_backbone=True, use_pretrained_backbone=False, backbone="resnet18",
                                     d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                     num_queries=10, num_labels=5)
    torch.manual_seed(0)
    model = transformers.DetrForObjectDetection(config).eval()
    x = {"pixel_values": torch.randn(2, 3, 64, 64)}
    assert any(type(m).__name__ == "DetrFrozenBatchNorm2d" for m in model.modules())
    small = surgery.compress(model, [ChannelPrune(0.5), Shrink()], x)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (n(model), n(small)) == (11220362, 2821242)  # 0.998 kept before its norms were cut


def test_convnext_v2s_global_response_norm_lets_its_mlp_width_go():
    """ConvNeXt-V2's GRN: a vector norm over the positions, its mean over the channels (kept
    dividing by the full width) and weight and bias on the MLP's hidden channels."""
    import transformers
    from passes import ChannelPrune, Shrink
    config = transformers.ConvNextV2Config(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], num_labels=5)
    torch.manual_seed(0)
    model = transformers.ConvNextV2ForImageClassification(config).eval()
    for m in model.modules():  # zero-initialised, the GRN would be the identity
        if type(m).__name__ == "ConvNextV2GRN":
            torch.nn.init.normal_(m.weight)
            torch.nn.init.normal_(m.bias)
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    masked = surgery.compress(model, [ChannelPrune(0.5)], x)
    small = surgery.compress(masked, [Shrink()], x)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (n(model), n(small)) == (32653, 10057)
    assert small.get_submodule("convnextv2.encoder.stages.0.layers.0.grn").weight.shape == (1, 1, 1, 16)
    fresh = torch.randn(3, 3, 48, 40)
    assert torch.allclose(small(pixel_values=fresh).logits, masked(pixel_values=fresh).logits, atol=1e-5)
