"""Does training with compressed activations still learn? A small CNN on the sklearn digits
(8x8 images), trained uncompressed and with CompressActivations("dct", keep=0.1) on every conv
(and on the whole model), same seeds, same split, same schedule; test accuracy compared.

    OMP_NUM_THREADS=2 python benchmarks/activation_digits.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_result  # noqa: E402

import surgery  # noqa: E402
from passes import CompressActivations  # noqa: E402


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed split: 30% test, stratified, random_state=0; pixels scaled to [0, 1]."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    tr, te = train_test_split(range(len(y)), test_size=0.3, random_state=0, stratify=data.target)
    return x[tr], y[tr], x[te], y[te]


class DigitsCNN(nn.Module):
    """Three 3x3 convs (8x8 -> pool -> 4x4) and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(1, 32, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3, self.relu3 = nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()
        self.fc = nn.Linear(64 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        return self.fc(torch.flatten(self.relu3(self.conv3(x)), 1))


def train(passes: list, seed: int, epochs: int, data, batch: int = 32) -> tuple[float, int, int]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    net = DigitsCNN()
    model = surgery.compress(net, passes, (xtr[:64],)) if passes else surgery.capture(net, (xtr[:64],))
    mem = surgery.activation_memory(model, (xtr[:64],), lambda out: F.cross_entropy(out, ytr[:64]))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(ytr), generator=gen).split(batch):
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    return 100 * acc, mem.baseline_bytes, mem.compressed_bytes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (a model this small only loses time to more threads on a busy machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    data = digits()
    configs = [("uncompressed", []),
               ("dct keep=0.1 on every conv", [CompressActivations("dct", select=nn.Conv2d, keep=0.1)]),
               ("dct keep=0.1 whole model", [CompressActivations("dct", keep=0.1)])]
    rows, means = [], {}
    for label, passes in tqdm(configs, desc="configs"):
        accs, mem = [], None
        for seed in seeds:
            acc, base, comp = train(passes, seed, args.epochs, data)
            accs.append(acc)
            mem = (base, comp)
        means[label] = statistics.mean(accs)
        rows.append([label, " / ".join(f"{a:.2f}" for a in accs), f"{means[label]:.2f}",
                     f"{means[label] - means.get('uncompressed', means[label]):+.2f}",
                     f"{mem[0] / 1024:.1f}", f"{mem[1] / 1024:.1f}"])
    table = markdown_table(["activations", f"test accuracy % (seeds {args.seeds})", "mean %",
                            "vs uncompressed (points)", "saved KiB (batch 64, none)",
                            "saved KiB (batch 64, compressed)"], rows)
    print(table)
    gap = means["uncompressed"] - means["dct keep=0.1 on every conv"]
    notes = (f"- {len(data[1])} train / {len(data[3])} test images (sklearn digits, stratified split, "
             f"random_state=0); Adam lr 2e-3, cosine schedule, {args.epochs} epochs, batch 32.\n"
             f"- acceptance (dct keep=0.1 on every conv within 1 point of uncompressed, mean over seeds): "
             f"gap {gap:+.2f} points -> {'met' if gap <= 1.0 else 'NOT met'}.\n"
             "- per-conv regions compress only what each conv saves (its input; conv1's input is the batch,"
             " which needs no gradient and passes through) while each ReLU still saves its output outside"
             " the regions, so per-conv compression changes the gradients but saves little memory (it adds a"
             " packed copy of each ReLU output a conv reads). Select a container or the whole model to"
             " save memory (last row).\n")
    path = write_result("activation_digits", "Training the digits CNN with DCT-compressed activations", None,
                        table, notes)
    print(notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
