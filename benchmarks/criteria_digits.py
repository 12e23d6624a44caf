"""Every ChannelPrune criterion on real data: scikit-learn's bundled digits, the digits CNN and MLP.

For each seed a dense model is trained; then, for each criterion and each MACs budget
(``ChannelPrune(target_macs=...)``: keep 70%, 50%, 30% of the MACs), the model is pruned and
shrunk (one shot), its test accuracy taken, fine-tuned briefly and taken again. Data criteria
calibrate on 8 training batches of 64 (``(inputs, target)`` pairs, cross-entropy). Mean and spread
(standard deviation) over the seeds; the plot shows test accuracy against the MACs kept.

    OMP_NUM_THREADS=1 python benchmarks/criteria_digits.py [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import surgery  # noqa: E402
from benchmarks._report import RESULTS, markdown_table, write_result  # noqa: E402
from benchmarks.digits import accuracy, load_digits_split, make_cnn, make_mlp, train  # noqa: E402
from passes import ChannelPrune, Shrink  # noqa: E402
from passes._importance import DATA_CRITERIA, GRADIENT_CRITERIA  # noqa: E402
from passes.channel_prune import CRITERIA  # noqa: E402
from surgery.io.macs import count_macs  # noqa: E402

BUDGETS = (0.7, 0.5, 0.3)
MODELS = {  # name: (builder, input view, dense epochs, fine-tune epochs, fine-tune lr)
    "CNN": (make_cnn, "img", 30, 5, 1e-3),
    "MLP": (make_mlp, "x", 60, 10, 1e-3),
}
CALIBRATION_BATCHES, BATCH = 8, 64


def _inputs(d, view: str, split: str) -> torch.Tensor:
    return getattr(d, f"{view}_{split}") if view == "img" else getattr(d, f"x_{split}")


def run_model(name: str, seeds: list[int]) -> list[dict]:
    build, view, epochs, ft_epochs, ft_lr = MODELS[name]
    d = load_digits_split(0)
    x_tr, x_te = _inputs(d, view, "train"), _inputs(d, view, "test")
    rows = []
    for seed in seeds:
        dense = train(build(seed=seed), x_tr, d.y_train, epochs=epochs, seed=seed, penalty=False,
                      cosine=name == "CNN")
        base_acc = accuracy(dense, x_te, d.y_test)
        base_macs = sum(count_macs(dense, (x_te[:1],)).values())
        base_params = sum(p.numel() for p in dense.parameters())
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(x_tr), generator=g)[:CALIBRATION_BATCHES * BATCH]
        calibration = [(x_tr[order[i:i + BATCH]], d.y_train[order[i:i + BATCH]])
                       for i in range(0, len(order), BATCH)]
        for criterion in CRITERIA:
            for budget in BUDGETS:
                kw = dict(criterion=criterion, target_macs=budget, seed=seed)
                if criterion in DATA_CRITERIA:
                    kw["calibration"] = calibration
                if criterion in GRADIENT_CRITERIA:
                    kw["loss_fn"] = F.cross_entropy
                small = surgery.compress(dense, [ChannelPrune(**kw), Shrink()], (x_te[:2],))
                one_shot = accuracy(small, x_te, d.y_test)
                macs = sum(count_macs(small, (x_te[:1],)).values()) / base_macs
                params = sum(p.numel() for p in small.parameters()) / base_params
                train(small, x_tr, d.y_train, epochs=ft_epochs, lr=ft_lr, seed=seed, penalty=False)
                rows.append(dict(model=name, seed=seed, criterion=criterion, budget=budget, dense=base_acc,
                                 one_shot=one_shot, tuned=accuracy(small, x_te, d.y_test), macs=macs, params=params))
        print(f"{name} seed {seed}: dense {base_acc:.4f}", file=sys.stderr, flush=True)
    return rows


def _ms(values: list[float], scale: float = 100) -> tuple[float, float]:
    return statistics.mean(values) * scale, (statistics.stdev(values) * scale if len(values) > 1 else 0.0)


def summarise(rows: list[dict]) -> tuple[list[list], dict]:
    table, stats = [], {}
    for name in MODELS:
        dense = _ms([r["dense"] for r in rows if r["model"] == name and r["criterion"] == CRITERIA[0]
                     and r["budget"] == BUDGETS[0]])
        table.append([name, "dense", "1.00", f"{dense[0]:.2f} ± {dense[1]:.2f}", "-", "1.000", "1.000"])
        stats[name, "dense"] = dense
        for budget in BUDGETS:
            for criterion in CRITERIA:
                sel = [r for r in rows if r["model"] == name and r["criterion"] == criterion and r["budget"] == budget]
                if not sel:
                    continue
                one, tuned = _ms([r["one_shot"] for r in sel]), _ms([r["tuned"] for r in sel])
                macs, params = statistics.mean(r["macs"] for r in sel), statistics.mean(r["params"] for r in sel)
                stats[name, criterion, budget] = dict(one=one, tuned=tuned, macs=macs, params=params)
                table.append([name, criterion, f"{budget:.2f}", f"{one[0]:.2f} ± {one[1]:.2f}",
                              f"{tuned[0]:.2f} ± {tuned[1]:.2f}", f"{macs:.3f}", f"{params:.3f}"])
    return table, stats


def verdict(stats: dict) -> str:
    """The issue's goals, checked on the figures."""
    l1 = stats["CNN", "l1", 0.5]["one"]
    lines = []
    for c in ("taylor", "activation"):
        s = stats["CNN", c, 0.5]["one"]
        spread = max(l1[1], s[1])
        above = "above" if s[0] - l1[0] > spread else "NOT above"
        lines.append(f"CNN at 50% MACs, one shot: {c} {s[0]:.2f} vs l1 {l1[0]:.2f} (difference {s[0] - l1[0]:+.2f}, "
                     f"largest spread {spread:.2f}): {above} l1 by more than the spread.")
    dense = stats["CNN", "dense"][0]
    tuned = {c: stats["CNN", c, 0.5]["tuned"][0] for c in CRITERIA}
    worst = min(tuned, key=tuned.get)
    lines.append(f"CNN at 50% MACs after fine-tuning: lowest {worst} {tuned[worst]:.2f}, dense {dense:.2f}: "
                 + ("every criterion within 1 point of dense" if dense - tuned[worst] <= 1
                    else "NOT every criterion within 1 point of dense") + ".")
    for name in MODELS:  # for the record: the worst case over every budget
        d = stats[name, "dense"][0]
        w = min((v["tuned"][0], k[1], k[2]) for k, v in stats.items() if k[0] == name and len(k) == 3)
        lines.append(f"{name}, any budget, after fine-tuning: lowest {w[0]:.2f} ({w[1]} at {w[2]:.0%} MACs), "
                     f"dense {d:.2f} ({d - w[0]:.2f} points below).")
    return "\n".join(f"- {line}" for line in lines)


def plot(stats: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(MODELS), figsize=(5.5 * len(MODELS), 8), sharex=True)
    for col, name in enumerate(MODELS):
        for row, (key, label) in enumerate((("one", "one shot"), ("tuned", "after fine-tuning"))):
            ax = axes[row][col]
            for criterion in CRITERIA:
                pts = sorted((stats[name, criterion, b]["macs"], *stats[name, criterion, b][key]) for b in BUDGETS)
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=criterion,
                            linestyle="--" if criterion in DATA_CRITERIA else "-")
            ax.axhline(stats[name, "dense"][0], color="k", linewidth=0.8, label="dense")
            ax.set_title(f"digits {name}: {label}")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("MACs kept (fraction of dense)")
    axes[0][0].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    rows = [r for name in MODELS for r in run_model(name, args.seeds)]
    table, stats = summarise(rows)
    heads = ["model", "criterion", "MACs budget", "test acc. % one shot", "test acc. % fine-tuned", "MACs kept",
             "params kept"]
    text = markdown_table(heads, table)
    notes = (f"{verdict(stats)}\n\nSeeds {args.seeds} (model initialisation, training order, calibration batches); "
             "digits split fixed (seed 0, 1437 train / 360 test). Dense: CNN 30 epochs (cosine), MLP 60; fine-tune: "
             "CNN 5 epochs, MLP 10, Adam 1e-3. MACs and params kept are measured on the shrunk models. The MLP has no "
             "BatchNorm, so bn_scale falls back to l1 there. Plot: criteria_digits.png.")
    print(text + "\n\n" + notes)
    if not args.no_write:
        plot(stats, RESULTS / "criteria_digits.png")
        write_result("criteria_digits", "ChannelPrune criteria on digits: accuracy against a MACs budget", None,
                     text, notes)


if __name__ == "__main__":
    main()
