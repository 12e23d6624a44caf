"""Prune a Hugging Face BERT classifier and get it back in its own class, saved and reloaded.

Builds ``BertForSequenceClassification`` from a config (random weights, no download; a
pretrained model works the same), prunes half of its attention heads and MLP units, and shrinks
it into its own classes (``Shrink(into="modules")``): the same class and qualified names, every
layer sliced, verified against the masked model. BERT's LayerNorm stream cannot be narrowed in a
LayerNorm of its own class, so ``normalised=False`` keeps it. The pruned model is saved with
``save_pretrained`` and reloaded with ``surgery.load_pruned`` (BERT's head size follows its config,
so the config keeps its sizes and carries the pruning plan). It prints:

    BertForSequenceClassification: 3,613,699 -> 2,003,971 params (0.55)
    heads per layer: [2, 2, 2, 2]; MLP widths: [512, 512, 512, 512]
    reloaded from bert_pruned/: logits equal: True

The embedding tables, as wide as the stream, are most of what is left.

    python examples/prune_hf.py [--layers 4] [--hidden 256] [-o bert_pruned]
"""
from __future__ import annotations

import argparse
import warnings

import torch
from transformers import BertConfig, BertForSequenceClassification

import surgery
from passes import ChannelPrune, Shrink


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("-o", "--output", default="bert_pruned")
    args = ap.parse_args()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=4, intermediate_size=4 * args.hidden, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    x = {"input_ids": torch.randint(5, 1000, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the config keeps its sizes": said above
        small = surgery.compress(model, [ChannelPrune(0.5, normalised=False), Shrink(into="modules")],
                                 example_inputs=x)
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, small))
    print(f"{type(small).__name__}: {before:,} -> {after:,} params ({after / before:.2f})")
    layers = small.bert.encoder.layer
    heads = [lay.attention.self.query.out_features // lay.attention.self.attention_head_size for lay in layers]
    print(f"heads per layer: {heads}; MLP widths: {[lay.intermediate.dense.out_features for lay in layers]}")
    small.save_pretrained(args.output)
    again = surgery.load_pruned(BertForSequenceClassification, args.output).eval()
    with torch.no_grad():
        same = torch.allclose(again(**x).logits, small(**x).logits, atol=1e-6)
    print(f"reloaded from {args.output}/: logits equal: {same}")


if __name__ == "__main__":
    main()
