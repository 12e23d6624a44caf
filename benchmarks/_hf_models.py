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
HF_MODELS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    # encoders
    "bert": ("encoder", "BertConfig", _SMALL, "BertForSequenceClassification"),
    "roberta": ("encoder", "RobertaConfig", _SMALL, "RobertaForSequenceClassification"),
    "distilbert": ("encoder", "DistilBertConfig", dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **_TEXT),
                   "DistilBertForSequenceClassification"),
    "albert": ("encoder", "AlbertConfig", dict(_SMALL, embedding_size=16), "AlbertForSequenceClassification"),
    "electra": ("encoder", "ElectraConfig", dict(_SMALL, embedding_size=16), "ElectraForSequenceClassification"),
    "deberta_v2": ("encoder", "DebertaV2Config", _SMALL, "DebertaV2ForSequenceClassification"),
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
}


def example_inputs(name: str, seed: int = 0, batch: int = 2, length: int = 9) -> dict[str, Any]:
    """Keyword inputs for model `name`: token ids and an attention mask (text), pixels (vision),
    mel features (audio); decoder ids too for encoder-decoders."""
    kind = HF_MODELS[name][0]
    g = torch.Generator().manual_seed(seed)
    if kind == "vision":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    if kind == "audio":
        return {"input_features": torch.randn(batch, 16, 32, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones(batch, length, dtype=torch.long)}
    if kind == "encoder-decoder":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, max(2, length // 2)), generator=g)
    if kind in ("decoder", "encoder-decoder"):
        out["use_cache"] = False  # a generation cache is no tensor a graph can return
    return out


def build_hf(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model (eval mode, random weights from `seed`) and its example inputs. Encoders and
    vision models come with the classification head a user fine-tunes (their base models return
    the residual stream itself, whose width then cannot change); Whisper is represented by its
    encoder, with an audio-classification head."""
    import transformers

    kind, config_name, kwargs, model_name = HF_MODELS[name]
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model: torch.nn.Module = getattr(transformers, model_name)(config)
    return model.eval(), example_inputs(name, seed)


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of a (nested) model output, in order: what sweeps and tests compare."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in output_tensors(item)]
    return []
