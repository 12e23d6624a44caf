"""Wall time of ChannelPrune(ratio) -> Shrink against Torch-Pruning's, on the models both prune.

The shrink sweep (benchmarks/shrink_sweep.py) times each tool once per model, one after the
other, beside its exports and latencies; on this shared machine a slowdown between the two
phases moves a ratio by 20-30%. This benchmark does nothing but time, and interleaves: per
model (in its own subprocess), after one untimed warm-up run of each tool (see
shrink_sweep.warm_up), --rounds rounds of one surgery run and one Torch-Pruning run, the order
swapped every round, each run after a gc.collect(). Surgery's run is what a user writes,
``surgery.compress(model, [ChannelPrune(ratio), Shrink()], x)``, verification included (its
share is the "verify" column: Shrink's masked and shrunk reference runs, which Torch-Pruning
does not do); Torch-Pruning's is shrink_sweep's (benchmarks/_torch_pruning.py), on a fresh copy
of the model each run, since it prunes in place. Each tool's figure is the median of its runs;
the ratio is surgery's over Torch-Pruning's.

The models are those of the sweep's rows file (benchmarks/results/shrink_sweep*.jsonl) that
both tools prune (surgery exact and smaller, Torch-Pruning's outputs of the original shapes and
fewer parameters), or --models.
Rows go to benchmarks/results/shrink_speed_<family>.jsonl (resumable, as the sweep's) and the
table to shrink_speed_<family>.md.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/shrink_speed.py --family timm
    OMP_NUM_THREADS=1 python benchmarks/shrink_speed.py --family torchvision --models resnet18,mobilenet_v2
    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/shrink_speed.py --family hf --scale base

--scale base times the Hugging Face models at the sizes of each architecture's smallest published
checkpoint (BERT-base, ViT-B/16, OPT-125m...; see _hf_models.HF_BASE) instead of the sweep's toy
configs of 2 layers of width 32, on which both tools' fixed costs are all there is to time.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from _hf_models import SCALES  # noqa: E402
from _report import markdown_table, write_result  # noqa: E402
from _sweep_models import subject  # noqa: E402
from _torch_pruning import time_limit, tp_prune  # noqa: E402
from shrink_sweep import FAMILIES, _ours, _tp_family, result_name, warm_up  # noqa: E402

TP_LIMIT = 120.0  # seconds for one Torch-Pruning run; the sweep found these models within it


def both_prune(family: str) -> list[str]:
    """The models of the sweep's rows file that both tools prune: surgery exact and smaller,
    Torch-Pruning working (outputs of the original shapes) and smaller. A model Torch-Pruning
    returns whole (GPT-2, whose Conv1D layers it does not know) is not one it prunes."""
    rows: dict[str, dict] = {}
    path = HERE / "results" / f"{result_name(family)}.jsonl"
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[r["model"]] = r  # the last row of a model wins (a --redo appends)
    return [n for n, r in rows.items() if r.get("exact") and r.get("tp_ok") and r["params_after"] < r["params_before"]
            and (r.get("tp_params") or r["params_before"]) < r["params_before"]]


def time_one(family: str, name: str, size: int, ratio: float, rounds: int, scale: str = "toy") -> dict:
    """Interleaved timings of both tools on one model (see the module docstring); `scale`: of a
    Hugging Face model (see _hf_models.build_hf)."""
    import torch

    import surgery
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    sub = subject(family, name, size, scale)
    x_tp = sub.inputs[0] if family in ("torchvision", "video") else sub.inputs
    warm_up("ours", ratio, family)
    warm_up("tp", ratio, family)
    ours, verify, tp = [], [], []

    def run_ours() -> None:
        small, t = _ours(sub.model, sub.inputs, ratio, 1)  # collects garbage before it starts the clock
        ours.append(t)
        verify.append(surgery.shrink_report(small).verify_seconds)

    def run_tp() -> None:
        model = sub.rebuild()
        gc.collect()
        t = time.perf_counter()
        with time_limit(TP_LIMIT):
            tp_prune(model, x_tp, ratio, _tp_family(family))
        tp.append(time.perf_counter() - t)

    for r in range(rounds):
        for run in ((run_ours, run_tp) if r % 2 == 0 else (run_tp, run_ours)):
            run()
    return {"model": name, "ours": statistics.median(ours), "ours_times": ours, "verify": statistics.median(verify),
            "tp": statistics.median(tp), "tp_times": tp, "ratio": statistics.median(ours) / statistics.median(tp)}


def table(rows: list[dict]) -> tuple[str, str]:
    """The markdown table and its summary line."""
    timed = [r for r in rows if "ratio" in r]
    lines = [[r["model"], f"{r['ours']:.3f}", f"{r['verify']:.3f}", f"{r['tp']:.3f}", f"{r['ratio']:.2f}",
              "yes" if r["ratio"] < 1 else "no"] if "ratio" in r else [r["model"], "-", "-", "-", "-", r["error"]]
             for r in rows]
    tab = markdown_table(["model", "surgery s", "of which verify s", "Torch-Pruning s", "ratio", "surgery faster"],
                         lines)
    if not timed:
        return tab, "no model timed"
    faster = sum(r["ratio"] < 1 for r in timed)
    faster_nv = sum((r["ours"] - r["verify"]) < r["tp"] for r in timed)
    ratios = sorted(r["ratio"] for r in timed)
    text = (f"{len(timed)} models timed ({len(rows) - len(timed)} failed): surgery took less wall time on "
            f"{faster}/{len(timed)} ({faster / len(timed):.0%}); median ratio {statistics.median(ratios):.2f}, "
            f"worst {ratios[-1]:.2f}. Without its two verification runs: {faster_nv}/{len(timed)}.")
    return tab, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=FAMILIES, default="torchvision")
    ap.add_argument("--models", default="", help="comma-separated names (default: those both tools prune in the sweep)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--scale", choices=SCALES, default="toy",
                    help="hf: the sweep's toy configs, or the sizes of each architecture's smallest checkpoint")
    ap.add_argument("--rounds", type=int, default=5, help="timed runs per tool and model, interleaved")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per model")
    ap.add_argument("--redo", action="store_true", help="rerun models already in the rows file")
    ap.add_argument("--no-write", action="store_true", help="do not write the table into benchmarks/results/")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("ROW " + json.dumps(time_one(args.family, args.one, args.size, args.ratio, args.rounds, args.scale)),
              flush=True)
        return
    if args.scale != "toy" and args.family != "hf":
        ap.error("--scale is for --family hf")
    names = [n for n in args.models.split(",") if n] or both_prune(args.family)
    stem = f"shrink_speed_{args.family}" + ("" if args.scale == "toy" else f"_{args.scale}")
    rows_path = HERE / "results" / f"{stem}.jsonl"
    done: dict[str, dict] = {}
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["model"]] = r
    from tqdm import tqdm
    for name in tqdm(names, desc=f"shrink speed ({args.family})"):
        if name in done and not args.redo:
            continue
        cmd = [sys.executable, __file__, "--one", name, "--family", args.family, "--ratio", str(args.ratio),
               "--size", str(args.size), "--rounds", str(args.rounds), "--scale", args.scale]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            found = [ln[4:] for ln in p.stdout.splitlines() if ln.startswith("ROW ")]
            tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
            row = json.loads(found[-1]) if found else {"model": name, "error": f"exit {p.returncode}: {tail}"[:300]}
        except subprocess.TimeoutExpired:
            row = {"model": name, "error": f"timeout after {args.timeout} s"}
        done[name] = row
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tqdm.write(f"{name}: " + (f"ours {row['ours']:.3f} s, TP {row['tp']:.3f} s, ratio {row['ratio']:.2f}"
                                  if "ratio" in row else row["error"]))
    everything = list(dict.fromkeys([*both_prune(args.family), *names]))
    tab, text = table([done[n] for n in everything if n in done])
    print(text)
    if args.no_write:
        return
    command = " ".join(["python", "benchmarks/shrink_speed.py", *sys.argv[1:]])  # threads, taskset, commit: _report
    scale = ", at the sizes of published checkpoints" if args.scale == "base" else ""
    path = write_result(stem, f"Shrink speed ({args.family}{scale}): surgery against Torch-Pruning, interleaved, "
                        f"ratio {args.ratio}", command, tab, text, then=bool(args.models))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
