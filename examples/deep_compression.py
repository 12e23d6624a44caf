"""Deep Compression of a digits MLP: gradual magnitude pruning, k-means weight sharing, a compact file.

Trains a 64-256-256-10 MLP on digits, prunes 90% of its weights by magnitude on a cubic (AGP)
schedule while fine-tuning (pruned weights stay zero), bakes the masks in, shares the surviving
weights among 16 values per tensor (4 bits, k-means; the codebooks fine-tune), and stores the
result as in Deep Compression (sparse indices + codebook indices), saved in surgery's compact
archive, which holds no pickled code and reloads bit for bit. It prints (2 CPU cores, about 20 s):

    dense: 85,002 params, 340,008 bytes as float32, test accuracy 96.9%
    pruned to 90% zeros (AGP): test accuracy 96.9%
    + 4-bit weight sharing: test accuracy 96.9%
    stored as in Deep Compression: 11,997 bytes (28.3x smaller), 10,964 Huffman-coded (31.0x); compact
    archive mlp.surg reloads bit for bit: True

    python examples/deep_compression.py [--sparsity 0.9] [--bits 4] [--epochs 20] [-o mlp.surg]
"""
from __future__ import annotations

import argparse

import torch
from _digits import accuracy, digits, fit
from torch import nn

import surgery
from passes import AGP, MagnitudePrune, WeightShare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("-o", "--output", default="mlp.surg")
    args = ap.parse_args()
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = digits(flat=True)
    dense = fit(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)),
                x_tr, y_tr, args.epochs)
    n = sum(p.numel() for p in dense.parameters())
    print(f"dense: {n:,} params, {4 * n:,} bytes as float32, test accuracy {accuracy(dense, x_te, y_te):.1%}")

    steps = args.epochs * ((len(x_tr) + 63) // 64)  # the schedule reaches its sparsity at 3/4 of the fine-tune
    gm = surgery.compress(dense, [MagnitudePrune(args.sparsity, schedule=AGP(0, 3 * steps // 4, every=10))],
                          example_inputs=(x_tr[:2],))
    fit(gm, x_tr, y_tr, args.epochs, after_step=lambda: surgery.step(gm))
    pruned = surgery.finalize(gm)
    print(f"pruned to {args.sparsity:.0%} zeros (AGP): test accuracy {accuracy(pruned, x_te, y_te):.1%}")

    shared = surgery.compress(pruned, [WeightShare(bits=args.bits, finetune=True)], example_inputs=(x_tr[:2],))
    fit(shared, x_tr, y_tr, max(1, args.epochs // 4))  # only the codebooks train
    shared = surgery.finalize(shared)
    print(f"+ {args.bits}-bit weight sharing: test accuracy {accuracy(shared, x_te, y_te):.1%}")

    size = surgery.compressed_size(shared)
    surgery.save(shared, args.output)
    again = surgery.load(args.output, model=shared)
    same = all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), shared.state_dict().values()))
    print(f"stored as in Deep Compression: {size.total('shared'):,} bytes ({size.ratio('shared'):.1f}x smaller), "
          f"{size.total('huffman'):,} Huffman-coded ({size.ratio('huffman'):.1f}x); compact archive {args.output} "
          f"reloads bit for bit: {same}")


if __name__ == "__main__":
    main()
