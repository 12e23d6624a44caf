"""The learnable-mask passes on real data (scikit-learn's digits, fixed split and seeds):
DAM on an MLP and a CNN, GumbelMask subnetwork discovery on a frozen MLP, Sparsifier on the
CNN. Each masked model is shrunk (exactness checked by Shrink) and exported to TorchScript.

    OMP_NUM_THREADS=2 python benchmarks/masks_digits.py [--seeds 0 1 2 3]
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import surgery  # noqa: E402
from benchmarks._report import markdown_table, write_result  # noqa: E402
from benchmarks.digits import (accuracy, balanced_accuracy, load_digits_split, make_cnn, make_mlp,  # noqa: E402
                               make_transformer, train)
from passes import DAM, GumbelMask, Shrink, Sparsifier  # noqa: E402

MLP_EPOCHS, CNN_EPOCHS, TRANSFORMER_EPOCHS = 60, 30, 40
DAM_MLP = dict(lam=0.1, cold_start=300)       # ~13 epochs of 23 steps with every unit open
DAM_CNN = dict(lam=0.3, cold_start=0)         # with a cosine learning rate (see notes)
DAM_TRANSFORMER = dict(lam=1.0, cold_start=0)
GUMBEL = dict(alpha=1e-3, epochs=30)
SPARSE = dict(eps=0.1, weight=1.0, double_every=46, a_max=256.0, epochs=10, lr=1e-3)


def hidden_units(model: nn.Module, kind: type, names: list[str]) -> int:
    mods = dict(model.named_modules())
    return sum(mods[n].out_features if kind is nn.Linear else mods[n].out_channels for n in names)


def shrink_and_export(gm, example, tmp: Path, name: str):
    small = surgery.compress(gm, [Shrink()], (example,))
    surgery.export(small, tmp / f"{name}.pt", (example,))  # raises unless the reloaded file matches
    return small, small.report.max_rel_error


def dam_mlp(d, seed: int) -> dict:
    base = train(make_mlp(seed=seed), d.x_train, d.y_train, epochs=MLP_EPOCHS, seed=seed, penalty=False)
    gm = surgery.compress(make_mlp(seed=seed), [DAM(select=nn.Linear, exclude="4", **DAM_MLP)], (d.x_train[:2],))
    train(gm, d.x_train, d.y_train, epochs=MLP_EPOCHS, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        small, err = shrink_and_export(gm, d.x_test, Path(tmp), "dam_mlp")
    kept = hidden_units(small, nn.Linear, ["0", "2"])
    return dict(base=base, before=accuracy(base, d.x_test, d.y_test), masked=accuracy(gm, d.x_test, d.y_test),
                after=accuracy(small, d.x_test, d.y_test), kept=kept, total=256, err=err)


def dam_cnn(d, seed: int) -> dict:
    base = train(make_cnn(seed=seed), d.img_train, d.y_train, epochs=CNN_EPOCHS, seed=seed, penalty=False,
                 cosine=True)
    gm = surgery.compress(make_cnn(seed=seed), [DAM(select=nn.Conv2d, **DAM_CNN)], (d.img_train[:2],))
    train(gm, d.img_train, d.y_train, epochs=CNN_EPOCHS, seed=seed, cosine=True)
    with tempfile.TemporaryDirectory() as tmp:
        small, err = shrink_and_export(gm, d.img_test, Path(tmp), "dam_cnn")
    kept = hidden_units(small, nn.Conv2d, ["conv1", "conv2", "conv3"])
    return dict(base=base, before=accuracy(base, d.img_test, d.y_test), masked=accuracy(gm, d.img_test, d.y_test),
                after=accuracy(small, d.img_test, d.y_test), kept=kept, total=32 + 64 + 64, err=err)


def dam_transformer(d, seed: int) -> dict:
    """DAM on every Linear of the digits transformer but the head: one mask per channel group,
    so the residual stream (embedding, positions, norms, q/k/v inputs, o and fc2 outputs) is
    one decision, each block's attention heads (q, k, v and o's input) another, and each MLP's
    hidden width a third."""
    base = train(make_transformer(seed=seed), d.x_train, d.y_train, epochs=TRANSFORMER_EPOCHS, lr=1e-2,
                 seed=seed, penalty=False, cosine=True)
    gm = surgery.compress(make_transformer(seed=seed), [DAM(select=nn.Linear, exclude="head", **DAM_TRANSFORMER)],
                          (d.x_train[:2],))
    train(gm, d.x_train, d.y_train, epochs=TRANSFORMER_EPOCHS, lr=1e-2, seed=seed, cosine=True)
    with tempfile.TemporaryDirectory() as tmp:
        small, err = shrink_and_export(gm, d.x_test, Path(tmp), "dam_transformer")
    stream = small.get_submodule("embed").out_features
    hidden = sum(small.get_submodule(f"blocks.{i}.fc1").out_features for i in range(2))
    head_dim = 32 // base.blocks[0].heads
    heads = sum(small.get_submodule(f"blocks.{i}.q").out_features // head_dim for i in range(2))
    return dict(base=base, before=accuracy(base, d.x_test, d.y_test), masked=accuracy(gm, d.x_test, d.y_test),
                after=accuracy(small, d.x_test, d.y_test), kept=stream + heads + hidden, total=32 + 2 * 4 + 2 * 128,
                err=err, stream=stream, heads=heads, hidden=hidden, params=(sum(p.numel() for p in base.parameters()),
                                                      sum(p.numel() for p in small.parameters())))


def gumbel_zero(d, base_mlp: nn.Module, seed: int) -> dict:
    """Frozen trained MLP, new 2-way head: 'is the digit a 0'; gates on both hidden layers."""
    net = copy.deepcopy(base_mlp)
    torch.manual_seed(seed)
    net[4] = nn.Linear(128, 2)
    ytr, yte = (d.y_train == 0).long(), (d.y_test == 0).long()
    gm = surgery.compress(net, [GumbelMask(select=nn.Linear, exclude="4", alpha=GUMBEL["alpha"],
                                           freeze_weights=True, trainable="4")], (d.x_train[:2],))
    train(gm, d.x_train, ytr, epochs=GUMBEL["epochs"], seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        small, err = shrink_and_export(gm, d.x_test, Path(tmp), "gumbel")
    kept = hidden_units(small, nn.Linear, ["0", "2"])
    return dict(before=float("nan"), masked=balanced_accuracy(gm, d.x_test, yte),
                after=balanced_accuracy(small, d.x_test, yte), kept=kept, total=256, err=err)


def sparsify_cnn(d, base_cnn: nn.Module, seed: int) -> dict:
    x = d.img_test
    natural = surgery.activation_sparsity(
        surgery.compress(base_cnn, [Sparsifier(select=nn.Conv2d, eps=0.0, hard=True)], (x[:2],)), x, total=True)
    cfg = {k: v for k, v in SPARSE.items() if k not in ("epochs", "lr")}
    gm = surgery.compress(base_cnn, [Sparsifier(select=nn.Conv2d, **cfg)], (x[:2],))
    train(gm, d.img_train, d.y_train, epochs=SPARSE["epochs"], lr=SPARSE["lr"], seed=seed)
    hard = surgery.harden(gm)
    with tempfile.TemporaryDirectory() as tmp:
        surgery.export(hard, Path(tmp) / "sparse.pt", (x,))
    return dict(before=accuracy(base_cnn, x, d.y_test), after=accuracy(hard, x, d.y_test),
                natural=natural, sparsity=surgery.activation_sparsity(hard, x, total=True),
                per_tensor=surgery.activation_sparsity(hard, x))


def pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="*", default=[], help="extra seeds for a DAM robustness table")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.manual_seed(args.seed)
    d = load_digits_split(0)

    t0 = time.perf_counter()

    def stage(name: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {name} ...", flush=True)

    stage("DAM on the MLP")
    m = dam_mlp(d, args.seed)
    stage("DAM on the CNN")
    c = dam_cnn(d, args.seed)
    stage("DAM on the transformer")
    t = dam_transformer(d, args.seed)
    stage("GumbelMask on the frozen MLP")
    g = gumbel_zero(d, m["base"], args.seed)
    stage("Sparsifier on the CNN")
    s = sparsify_cnn(d, c["base"], args.seed)
    stage("done")

    headers = ["method", "model", "units kept", "removed", "acc. before", "acc. masked", "acc. after Shrink",
               "Shrink rel. err", "activation zeros", "goal"]
    rows = [
        ["DAM", "MLP 64-128-128-10", f"{m['kept']}/{m['total']}", pct(1 - m["kept"] / m["total"]), pct(m["before"]),
         pct(m["masked"]), pct(m["after"]), f"{m['err']:.1e}", "-", ">= 75% removed, within 1 pt"],
        ["DAM", "CNN 32-64-64", f"{c['kept']}/{c['total']}", pct(1 - c["kept"] / c["total"]), pct(c["before"]),
         pct(c["masked"]), pct(c["after"]), f"{c['err']:.1e}", "-", ">= 40% removed, within 2 pt"],
        ["DAM", f"transformer d32, 2 blocks (stream {t['stream']}/32, heads {t['heads']}/8, MLP {t['hidden']}/256; "
                f"params {t['params'][0]:,} -> {t['params'][1]:,})", f"{t['kept']}/{t['total']}",
         pct(1 - t["kept"] / t["total"]), pct(t["before"]), pct(t["masked"]), pct(t["after"]), f"{t['err']:.1e}", "-",
         ">= 40% removed, within 2 pt"],
        ["GumbelMask", "frozen MLP, 'is it a 0' head", f"{g['kept']}/{g['total']}", pct(1 - g["kept"] / g["total"]),
         "-", pct(g["masked"]) + " (bal.)", pct(g["after"]) + " (bal.)", f"{g['err']:.1e}", "-",
         "bal. acc >= 99%, <= 15% kept"],
        ["Sparsifier (hardened)", "CNN 32-64-64", "-", "-", pct(s["before"]), "-", pct(s["after"]) + " (hard)", "-",
         f"{pct(s['sparsity'])} (ReLU alone: {pct(s['natural'])})", ">= 70% zeros, within 1 pt"],
    ]
    table = markdown_table(headers, rows)
    print(table)
    notes = [
        f"Data: sklearn load_digits, stratified 80/20 split (random_state=0): {len(d.y_train)} train, "
        f"{len(d.y_test)} test. Seed {args.seed}. Adam, batch 64; MLP {MLP_EPOCHS} epochs at a constant lr 1e-2 "
        f"(the issue's reference recipe), CNN {CNN_EPOCHS} epochs at lr 1e-2 decayed to 0 (cosine, per step); the "
        "unmasked baselines ('acc. before') train the same way. At a constant lr the CNN's BatchNorm running "
        "statistics can lag the closing masks at the end of training (seed 2: 79% in eval mode, 98% with batch "
        "statistics); the cosine decay removes that.",
        f"DAM MLP {DAM_MLP}, DAM CNN {DAM_CNN} (cold_start in optimizer steps); GumbelMask {GUMBEL} on the frozen "
        f"baseline MLP with only the new head trainable; Sparsifier {SPARSE} fine-tuning the baseline CNN, then "
        "surgery.harden().",
        "'acc. after Shrink' is the physically smaller model returned by passes.Shrink (its own check: relative "
        "error vs the masked model); every shrunk / hardened model was exported with surgery.export and its "
        "reloaded TorchScript file verified.",
        "Sparsifier per tensor: " + ", ".join(f"{k} {pct(v)}" for k, v in s["per_tensor"].items()),
    ]
    if args.seeds:
        seed_rows = []
        for sd in args.seeds:
            print(f"DAM robustness, seed {sd} ...", flush=True)
            ms, cs = dam_mlp(d, sd), dam_cnn(d, sd)
            seed_rows.append([sd, pct(1 - ms["kept"] / 256), f"{100 * (ms['after'] - ms['before']):+.2f}",
                              pct(1 - cs["kept"] / 160), f"{100 * (cs['after'] - cs['before']):+.2f}"])
        seed_table = markdown_table(["seed", "DAM MLP removed", "MLP acc. change (pt)", "DAM CNN removed",
                                     "CNN acc. change (pt)"], seed_rows)
        print(seed_table)
        notes.append("DAM over other seeds (model init and batch order; same split):\n\n" + seed_table)
    if not args.no_write:
        cmd = f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/masks_digits.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_result("masks_digits", "Learnable masks on digits: DAM, GumbelMask, Sparsifier", cmd.strip(), table,
                     "\n\n".join(notes))


if __name__ == "__main__":
    main()
