"""Small Hugging Face transformers models built from configs (random weights, nothing
downloaded), with example inputs, for the capture and shrink sweeps and the tests.

    >>> from _hf_models import HF_MODELS, build_hf
    >>> model, inputs = build_hf("bert")
    >>> sorted(inputs)
    ['attention_mask', 'input_ids']
"""
from __future__ import annotations

from typing import Any

import torch

VOCAB = 128
# name -> (kind, config class name, config kwargs, model class name)
_TEXT = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **_TEXT)
_DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, max_position_embeddings=64, **_TEXT)
_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
               patch_size=8)
_DEBERTA_V3 = dict(relative_attention=True, max_relative_positions=-1, position_buckets=256, norm_rel_ebd="layer_norm",
                   share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0)
# DETR and its followers: a config-built ResNet backbone (nothing downloaded), 64 x 64 pixels
_RESNET = dict(model_type="resnet", embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])
_DETR = dict(use_timm_backbone=False, use_pretrained_backbone=False, d_model=32, encoder_layers=1, decoder_layers=2,
             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
             num_queries=10, num_labels=5, backbone_config=dict(_RESNET, out_features=["stage4"]))
_LEVELS = dict(out_features=["stage2", "stage3", "stage4"])
HF_MODELS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    # encoders
    "bert": ("encoder", "BertConfig", _SMALL, "BertForSequenceClassification"),
    "roberta": ("encoder", "RobertaConfig", _SMALL, "RobertaForSequenceClassification"),
    "distilbert": ("encoder", "DistilBertConfig", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **_TEXT),
                   "DistilBertForSequenceClassification"),
    "albert": ("encoder", "AlbertConfig", dict(_SMALL, embedding_size=16), "AlbertForSequenceClassification"),
    "electra": ("encoder", "ElectraConfig", dict(_SMALL, embedding_size=16), "ElectraForSequenceClassification"),
    # with DeBERTa-v3's disentangled attention (its checkpoints' settings; the config's defaults leave it out)
    "deberta_v2": ("encoder", "DebertaV2Config", dict(_SMALL, **_DEBERTA_V3), "DebertaV2ForSequenceClassification"),
    "mpnet": ("encoder", "MPNetConfig", _SMALL, "MPNetForSequenceClassification"),
    # decoder language models
    "gpt2": ("decoder", "GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, **_TEXT),
             "GPT2LMHeadModel"),
    "gpt_neo": ("decoder", "GPTNeoConfig", dict(hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64,
                                                attention_types=[[["global", "local"], 1]], window_size=8, **_TEXT),
                "GPTNeoForCausalLM"),
    "opt": ("decoder", "OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                         word_embed_proj_dim=32, max_position_embeddings=64, **_TEXT),
            "OPTForCausalLM"),
    "llama": ("decoder", "LlamaConfig", _DECODER, "LlamaForCausalLM"),
    "mistral": ("decoder", "MistralConfig", _DECODER, "MistralForCausalLM"),
    "qwen2": ("decoder", "Qwen2Config", _DECODER, "Qwen2ForCausalLM"),
    "qwen3": ("decoder", "Qwen3Config", dict(_DECODER, head_dim=16), "Qwen3ForCausalLM"),
    "phi3": ("decoder", "Phi3Config", _DECODER, "Phi3ForCausalLM"),
    "gemma": ("decoder", "GemmaConfig", dict(_DECODER, head_dim=16), "GemmaForCausalLM"),
    # encoder-decoders
    "t5": ("encoder-decoder", "T5Config", dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, **_TEXT),
           "T5ForConditionalGeneration"),
    "bart": ("encoder-decoder", "BartConfig", dict(d_model=32, encoder_layers=2, decoder_layers=2,
                                                   encoder_attention_heads=4, decoder_attention_heads=4,
                                                   encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                   max_position_embeddings=64, **_TEXT),
             "BartForConditionalGeneration"),
    # vision
    "vit": ("vision", "ViTConfig", _VISION, "ViTForImageClassification"),
    "deit": ("vision", "DeiTConfig", _VISION, "DeiTForImageClassification"),
    "beit": ("vision", "BeitConfig", dict(_VISION, use_mask_token=False), "BeitForImageClassification"),
    "dinov2": ("vision", "Dinov2Config", _VISION, "Dinov2ForImageClassification"),
    "swin": ("vision", "SwinConfig", dict(embed_dim=16, depths=[1, 1], num_heads=[2, 4], image_size=32,
                                          patch_size=4, window_size=4), "SwinForImageClassification"),
    "convnext": ("vision", "ConvNextConfig", dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32),
                 "ConvNextForImageClassification"),
    "clip_vision": ("vision", "CLIPConfig", dict(vision_config=_VISION, text_config=dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
        bos_token_id=1, eos_token_id=2)), "CLIPForImageClassification"),
    "whisper_encoder": ("audio", "WhisperConfig", dict(d_model=32, encoder_layers=2, decoder_layers=2,
                                                       encoder_attention_heads=4, decoder_attention_heads=4,
                                                       encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                                                       max_source_positions=16, max_target_positions=16,
                                                       decoder_start_token_id=1, **_TEXT),
                        "WhisperForAudioClassification"),
    # detection: the task model as users run it, its output the boxes and the decoder's stream
    "detr": ("detection", "DetrConfig", _DETR, "DetrForObjectDetection"),
    "conditional_detr": ("detection", "ConditionalDetrConfig", _DETR, "ConditionalDetrForObjectDetection"),
    "deformable_detr": ("detection", "DeformableDetrConfig",
                        dict(_DETR, backbone_config=dict(_RESNET, **_LEVELS), num_feature_levels=3,
                             encoder_n_points=2, decoder_n_points=2), "DeformableDetrForObjectDetection"),
    "table_transformer": ("detection", "TableTransformerConfig", _DETR, "TableTransformerForObjectDetection"),
    "rt_detr": ("detection", "RTDetrConfig",
                dict(backbone_config=dict(_RESNET, model_type="rt_detr_resnet", **_LEVELS),
                     use_pretrained_backbone=False, encoder_hidden_dim=32, encoder_in_channels=[32, 64, 128],
                     d_model=32, decoder_in_channels=[32] * 3,
                     num_feature_levels=3, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                     encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_labels=5), "RTDetrForObjectDetection"),
    "yolos": ("detection", "YolosConfig", dict(_VISION, image_size=[64, 64], num_detection_tokens=5, num_labels=5),
              "YolosForObjectDetection"),
}

# name -> config kwargs of the smallest published checkpoint of the architecture (the sizes users
# prune), for the models both tools prune in the sweep: ``build_hf(name, scale="base")``
_BASE_TEXT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
HF_BASE: dict[str, dict[str, Any]] = {
    "bert": dict(_BASE_TEXT, vocab_size=30522),  # bert-base-uncased
    "roberta": dict(_BASE_TEXT, vocab_size=50265, max_position_embeddings=514, type_vocab_size=1,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2),  # roberta-base
    "distilbert": dict(vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072),  # distilbert-base
    "albert": dict(_BASE_TEXT, vocab_size=30000, embedding_size=128),  # albert-base-v2
    "electra": dict(_BASE_TEXT, vocab_size=30522, embedding_size=768),  # electra-base-discriminator
    "deberta_v2": dict(_BASE_TEXT, vocab_size=128100, **_DEBERTA_V3),  # deberta-v3-base
    "mpnet": dict(_BASE_TEXT, vocab_size=30527),  # mpnet-base
    "gpt_neo": dict(hidden_size=768, num_layers=12, num_heads=12, vocab_size=50257, max_position_embeddings=2048,
                    attention_types=[[["global", "local"], 6]], window_size=256),  # gpt-neo-125M
    "opt": dict(hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=50272,
                word_embed_proj_dim=768, max_position_embeddings=2048),  # opt-125m
    "bart": dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, vocab_size=50265),  # bart-base
    "vit": dict(_BASE_TEXT, image_size=224, patch_size=16),  # vit-base-patch16-224
    "deit": dict(_BASE_TEXT, image_size=224, patch_size=16),  # deit-base-patch16-224
    "beit": dict(_BASE_TEXT, image_size=224, patch_size=16, use_mask_token=False),  # beit-base-patch16-224
    "convnext": dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3], num_stages=4, image_size=224),  # -tiny
    # detr-resnet-50 (the configs' defaults, ResNetConfig's are ResNet-50's) and yolos-tiny; 512 px
    "detr": dict(use_timm_backbone=False, use_pretrained_backbone=False,
                 backbone_config=dict(model_type="resnet", out_features=["stage4"])),
    "yolos": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                  image_size=[800, 1333], num_detection_tokens=100, use_mid_position_embeddings=False),
}
BASE_DETECTION_PIXELS = 512  # a side: the checkpoints' 800 x 1333 would be most of a CPU run
SCALES = ("toy", "base")


def example_inputs(name: str, seed: int = 0, batch: int = 2, length: int = 9, scale: str = "toy") -> dict[str, Any]:
    """Keyword inputs for model `name`: token ids and an attention mask (text), pixels (vision;
    224 px at scale "base"; detection: 64 px, 512 at scale "base"), mel features (audio); decoder
    ids too for encoder-decoders."""
    kind = HF_MODELS[name][0]
    g = torch.Generator().manual_seed(seed)
    if kind in ("vision", "detection"):
        if scale == "base":
            side = HF_BASE[name]["image_size"] if kind == "vision" else BASE_DETECTION_PIXELS
        else:
            side = 32 if kind == "vision" else 64
        return {"pixel_values": torch.randn(batch, 3, side, side, generator=g)}
    if kind == "audio":
        return {"input_features": torch.randn(batch, 16, 32, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    if kind == "encoder-decoder":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, max(2, length // 2)), generator=g)
    if kind in ("decoder", "encoder-decoder"):
        out["use_cache"] = False  # a generation cache is no tensor a graph can return
    return out


def build_hf(name: str, seed: int = 0, scale: str = "toy") -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model (eval mode, random weights from `seed`) and its example inputs. Encoders and
    vision models come with the classification head a user fine-tunes (their base models return
    the residual stream itself, whose width then cannot change); Whisper is represented by its
    encoder, with an audio-classification head. `scale`: "toy" (2 layers of width 32-64, the
    sweeps' and tests') or "base" (the smallest published checkpoint's sizes, see HF_BASE)."""
    import transformers

    kind, config_name, kwargs, model_name = HF_MODELS[name]
    if scale == "base":
        if name not in HF_BASE:
            raise KeyError(f"no base-scale config for {name!r}; those with one: {', '.join(HF_BASE)}")
        kwargs = HF_BASE[name]
    elif scale != "toy":
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model: torch.nn.Module = getattr(transformers, model_name)(config)
    return model.eval(), example_inputs(name, seed, scale=scale)


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of a (nested) model output, in order: what sweeps and tests compare."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in output_tensors(item)]
    return []
