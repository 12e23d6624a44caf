"""Magnitude pruning + weight sharing on real data: sklearn digits with a small CNN.

dense training -> sensitivity analysis (validation split, PNG + CSV) -> 90% magnitude pruning
with a short AGP fine-tune -> finalize -> 4-bit k-means sharing (+ a short centroid fine-tune)
-> test accuracy at each stage, storage sizes, compact archive round trip.

Run: OMP_NUM_THREADS=2 python benchmarks/weights_digits.py
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import surgery  # noqa: E402
from passes import AGP, MagnitudePrune, WeightShare  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import RESULTS, markdown_table, write_result  # noqa: E402


def digits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed stratified split of sklearn's 8x8 digits: 60% train, 15% validation, 25% test."""
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    idx = np.arange(len(y))
    trval, test = train_test_split(idx, test_size=0.25, stratify=d.target, random_state=seed)
    train, val = train_test_split(trval, test_size=0.2, stratify=d.target[trval], random_state=seed)
    return {k: (x[v], y[v]) for k, v in (("train", train), ("val", val), ("test", test))}


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    return float((model(data[0]).argmax(1) == data[1]).float().mean()) * 100


def train(model: nn.Module, data, epochs: int, lr: float, seed: int, on_step=None) -> None:
    """Adam, batch 64, fixed shuffling; `on_step(model)` after each optimizer step."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(epochs):
        model.train()
        for b in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
            if on_step is not None:
                on_step(model)


# read off the sensitivity table/plot: conv1 (288 weights) is fragile, fc1 (131k) robust; 91.7% overall
GUIDED = {"0.weight": 0.5, "2.weight": 0.85, "6.weight": 0.93, "8.weight": 0.7}


def compress_and_tune(gm, sparsity, data, args, x0) -> dict:
    """AGP pruning with fine-tune -> finalize -> k-means sharing (+ centroid fine-tune)."""
    acc = {}
    steps = args.finetune_epochs * -(-len(data["train"][1]) // 64)
    schedule = AGP(start_step=0, end_step=int(0.6 * steps), every=10)
    one_shot = surgery.finalize(surgery.compress(gm, [MagnitudePrune(sparsity)], example_inputs=(x0,)))
    acc["pruned, no fine-tune"] = accuracy(one_shot, data["test"])
    pruned = surgery.compress(gm, [MagnitudePrune(sparsity, schedule=schedule)], example_inputs=(x0,))
    train(pruned, data["train"], args.finetune_epochs, 5e-4, seed=2, on_step=surgery.step)
    pruned = surgery.finalize(pruned)
    acc["pruned + AGP fine-tune"] = accuracy(pruned, data["test"])
    weights = [m.weight for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    sparsity_now = float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))
    shared = surgery.compress(pruned, [WeightShare(bits=args.bits)], example_inputs=(x0,))
    acc[f"+ {args.bits}-bit sharing"] = accuracy(shared, data["test"])
    tuned = surgery.compress(pruned, [WeightShare(bits=args.bits, finetune=True)], example_inputs=(x0,))
    train(tuned, data["train"], 5, 1e-4, seed=3)
    tuned = surgery.finalize(tuned)
    acc[f"+ {args.bits}-bit sharing + centroid fine-tune"] = final = accuracy(tuned, data["test"])
    distinct = max(len(torch.unique(m.weight[m.weight != 0])) for m in tuned.modules()
                   if isinstance(m, (nn.Conv2d, nn.Linear)))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "digits.surg")
        surgery.save(tuned, path)
        archive = os.path.getsize(path)
        exact = all(torch.equal(v, tuned.state_dict()[k]) for k, v in surgery.load(path).items())
    spec = f"{sparsity:.0%} per tensor" if isinstance(sparsity, float) else \
        ", ".join(f"{k} {v:.0%}" for k, v in sparsity.items())
    print(f"{spec}: " + ", ".join(f"{k} {v:.2f}%" for k, v in acc.items()))
    return {"acc": acc, "final": final, "sparsity": sparsity_now, "distinct": distinct, "spec": spec,
            "sizes": surgery.compressed_size(tuned), "archive": archive, "exact": exact}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--finetune-epochs", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    data = digits()
    t_start = time.perf_counter()

    dense = cnn()
    train(dense, data["train"], args.epochs, 1e-3, seed=1)
    acc = {"dense": accuracy(dense, data["test"])}
    print(f"dense: test accuracy {acc['dense']:.2f}%")

    x0 = data["train"][0][:2]
    gm = surgery.capture(dense, (x0,))
    table = surgery.sensitivity(gm, lambda m: {"val accuracy": accuracy(m, data["val"])},
                                sparsities=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98))
    png = RESULTS / "weights_digits_sensitivity.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    table.plot(png, title="digits CNN: validation accuracy, one tensor pruned at a time")
    table.to_csv(RESULTS / "weights_digits_sensitivity.csv")
    print(table)

    results = {}
    for recipe, sparsity in (("uniform 90%", args.sparsity), ("sensitivity-guided", GUIDED)):
        results[recipe] = compress_and_tune(gm, sparsity, data, args, x0)
    took = time.perf_counter() - t_start

    rows = [["dense", "-", f"{acc['dense']:.2f}", "+0.00"]]
    for recipe, r in results.items():
        for stage, v in r["acc"].items():
            rows.append([f"{recipe}: {stage}", f"{r['sparsity']:.1%}", f"{v:.2f}", f"{v - acc['dense']:+.2f}"])
    md = markdown_table(["stage (test split, 450 images)", "weight sparsity", "accuracy %", "vs dense (points)"], rows)
    for recipe, r in results.items():
        loss = acc["dense"] - r["final"]
        md += (f"\n\n**{recipe}** ({r['spec']}): weight sparsity {r['sparsity']:.1%}, at most {r['distinct']} distinct "
               f"non-zero values per tensor, **loss {loss:.2f} points (goal <= 1)**; storage: "
               + ", ".join(f"{s} {r['sizes'].total(s)} B ({r['sizes'].ratio(s):.1f}x)" for s in ("dense", "sparse", "shared", "huffman"))
               + f", compact archive {r['archive']} B ({r['sizes'].total('dense') / r['archive']:.1f}x, bit-exact reload: {r['exact']})")
    md += ("\n\nSensitivity (validation accuracy %, one tensor pruned alone; "
           "![plot](weights_digits_sensitivity.png), CSV: weights_digits_sensitivity.csv):\n\n" + table.to_markdown())
    notes = (f"Model: Conv(1,32,3)-Conv(32,64,3)-MaxPool-Linear(1024,128)-Linear(128,10), "
             f"{sum(p.numel() for p in dense.parameters())} parameters; Adam: {args.epochs} epochs dense (lr 1e-3), "
             f"{args.finetune_epochs} epochs AGP fine-tune (lr 5e-4; AGP from 0 to the target over the first 60% "
             f"of the steps, every 10 steps), 5 epochs centroid fine-tune (lr 1e-4); fixed seeds and split. "
             f"The guided split is read off the sensitivity plot (as Han et al. do): the first conv, which "
             f"loses most, keeps half its weights; the large fc layer, which loses least, takes most of the "
             f"pruning. Total run time {took:.0f} s.")
    out = write_result("weights_digits", "Digits: 90% magnitude pruning (AGP) + 4-bit weight sharing",
                       "OMP_NUM_THREADS=2 python benchmarks/weights_digits.py", md, notes)
    print(md)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
