"""Training-step time of a DAM-masked ResNet-18 over the unmasked one, as a ratio in one run.

Both models are captured the same way (the unmasked one with no pass), then timed step by
step in alternation so that machine load hits both alike; the ratio is of medians.

    OMP_NUM_THREADS=2 python benchmarks/mask_overhead.py [--steps 20 --batch 16 --size 64]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from tqdm import tqdm  # noqa: E402

import surgery  # noqa: E402
from benchmarks._report import markdown_table, write_result  # noqa: E402
from passes import DAM  # noqa: E402


def step_time(model, opt, x, y) -> float:
    t = time.perf_counter()
    loss = F.cross_entropy(model(x), y) + surgery.penalty(model)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    surgery.step(model)
    return time.perf_counter() - t


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    load = os.getloadavg()[0]
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    plain = surgery.compress(net, [], (x[:2],))
    masked = surgery.compress(net, [DAM(lam=0.1)], (x[:2],))
    n_masks = len(surgery.masks(masked))
    n_calls = sum(1 for n in masked.graph.nodes if n.op == "call_module" and n.target in surgery.masks(masked))
    models = {"unmasked": plain, "DAM-masked": masked}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        m.train()
    for i in tqdm(range(args.warmup + args.steps), desc="steps"):
        order = list(models) if i % 2 == 0 else list(reversed(models))  # alternate who goes first
        for k in order:
            t = step_time(models[k], opts[k], x, y)
            if i >= args.warmup:
                times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["DAM-masked"] / med["unmasked"]
    # each iteration times both models back to back: their ratio is robust to load drifting
    paired = statistics.median(a / b for a, b in zip(times["DAM-masked"], times["unmasked"]))
    rows = [[k, f"{med[k] * 1e3:.1f}", f"{min(times[k]) * 1e3:.1f}"] for k in models]
    rows.append(["ratio (masked / unmasked)", f"**{ratio:.3f}**", f"{min(times['DAM-masked']) / min(times['unmasked']):.3f}"])
    table = markdown_table(["model", "median step ms", "best step ms"], rows)
    table += f"\n\nMedian of the per-iteration paired ratios: {paired:.3f}."
    print(table)
    if not args.no_write:
        cmd = f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/mask_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_result("mask_overhead", "DAM mask overhead: ResNet-18 training step", cmd.strip(), table,
                     notes=f"ResNet-18 (torchvision, weights=None, 10 classes), batch {args.batch}, "
                           f"{args.size}x{args.size} inputs, SGD; {n_masks} DAM masks (one per channel group) "
                           f"called at {n_calls} places; {args.steps} timed steps after {args.warmup} warm-up, "
                           "alternating the two models. Goal: ratio <= 1.10. Load average at the start: "
                           f"{load:.1f} on {os.cpu_count()} cores. On a shared machine run it with one thread: with "
                           "two, every op waits on thread barriers whenever another job holds a core, and small "
                           "element-wise ops then look many times dearer than their work.")
    return ratio


if __name__ == "__main__":
    main()
