"""Prune a torchvision ResNet-18 trained on digits to half its MACs, fine-tune it, export it.

The digits (scikit-learn's bundled 8x8 images) are upsampled to 3x32x32. The dense model trains
for a few epochs; ChannelPrune keeps half the MACs, choosing channels by the `activation`
criterion on calibration batches from the training set; Shrink removes them (verifying the
smaller model against the masked one); a short fine-tune recovers the accuracy, and the model is
exported as a .pt2 program (reloaded and checked at a second batch size). It prints (2 CPU
cores, about a minute; one shot loses most of the accuracy at this cut, the fine-tune wins it back):

    dense: 11,181,642 params, 37.0M MACs, test accuracy 95.8%
    pruned, one shot: 5,014,322 params, 18.4M MACs (0.50 of dense), test accuracy 10.0%
    fine-tuned: test accuracy 93.3%
    exported resnet18_digits.pt2 (20,326,077 bytes)

    python examples/prune_finetune_torchvision.py [--epochs 3] [--finetune-epochs 2] [-o resnet18_digits.pt2]
"""
from __future__ import annotations

import argparse
import os

import torch
import torchvision
from _digits import accuracy, digits, fit

import surgery
from passes import ChannelPrune, Shrink
from surgery.io import count_macs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--train-size", type=int, default=None, help="use only this many training images")
    ap.add_argument("-o", "--output", default="resnet18_digits.pt2")
    args = ap.parse_args()
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = digits(size=32, channels=3)
    x_tr, y_tr = x_tr[:args.train_size], y_tr[:args.train_size]
    model = fit(torchvision.models.resnet18(weights=None, num_classes=10), x_tr, y_tr, args.epochs)
    example = (x_te[:1],)
    macs = sum(count_macs(model, example).values())
    print(f"dense: {sum(p.numel() for p in model.parameters()):,} params, {macs / 1e6:.1f}M MACs, "
          f"test accuracy {accuracy(model, x_te, y_te):.1%}")

    calibration = [x_tr[i:i + 64] for i in range(0, 512, 64)]  # inputs only: a forward criterion
    small = surgery.compress(model, [ChannelPrune(criterion="activation", calibration=calibration, target_macs=0.5,
                                                  round_to=8), Shrink()], example_inputs=example)
    small_macs = sum(count_macs(small, example).values())
    print(f"pruned, one shot: {sum(p.numel() for p in small.parameters()):,} params, {small_macs / 1e6:.1f}M MACs "
          f"({small_macs / macs:.2f} of dense), test accuracy {accuracy(small, x_te, y_te):.1%}")

    fit(small, x_tr, y_tr, args.finetune_epochs)
    print(f"fine-tuned: test accuracy {accuracy(small, x_te, y_te):.1%}")
    surgery.export(small, args.output, example)  # reloaded with torch.export.load and verified
    print(f"exported {args.output} ({os.path.getsize(args.output):,} bytes)")


if __name__ == "__main__":
    main()
