"""Prune a timm model by half its channels, shrink it exactly and export it to ONNX.

Builds a timm model with random weights (``pretrained=False``: no download; with your own
weights it works the same), masks half of every channel group's channels by weight norm
(whole channel groups decide together: a residual stream is one decision), removes them with
Shrink, checks the smaller model against the masked one on a fresh input, and writes an .onnx
file that ONNX Runtime runs (verified against the model at two batch sizes). It prints, for the
default convnext_atto:

    convnext_atto: 3,695,520 -> 1,034,824 params (0.28), 0.55G -> 0.15G MACs
    max rel. difference to the masked model on a fresh input: 6.0e-07
    exported convnext_atto_half.onnx (4,425,262 bytes), run by ONNX Runtime

    python examples/prune_timm.py [--model convnext_atto] [--ratio 0.5] [--size 224] [-o convnext_atto_half.onnx]
"""
from __future__ import annotations

import argparse
import os

import timm
import torch

import surgery
from passes import ChannelPrune, Shrink
from surgery.io import count_macs
from surgery.verify import max_rel_diff, run_eval


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="convnext_atto")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args()
    output = args.output or f"{args.model}_half.onnx"
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = (torch.randn(1, 3, args.size, args.size),)
    masked = surgery.compress(model, [ChannelPrune(ratio=args.ratio, round_to=8)], example_inputs=x)
    small = surgery.compress(masked, [Shrink()], example_inputs=x)  # raises ShrinkMismatch rather than differ
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, small))
    macs = [sum(count_macs(m, x).values()) / 1e9 for m in (model, small)]
    print(f"{args.model}: {before:,} -> {after:,} params ({after / before:.2f}), "
          f"{macs[0]:.2f}G -> {macs[1]:.2f}G MACs")
    fresh = (torch.randn(2, 3, args.size, args.size),)
    print(f"max rel. difference to the masked model on a fresh input: "
          f"{max_rel_diff(run_eval(masked, fresh), run_eval(small, fresh)):.1e}")
    surgery.export(small, output, x)
    print(f"exported {output} ({os.path.getsize(output):,} bytes), run by ONNX Runtime")


if __name__ == "__main__":
    main()
