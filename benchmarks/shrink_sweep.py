"""ChannelPrune(ratio) -> Shrink -> export on every torchvision classification model.

One row per model: exact (max rel. error < 1e-4 on a fresh input, masked vs shrunk), params
and MACs before/after, surgery wall time (compress(model, [ChannelPrune, Shrink]), verification
included; the median of --repeats runs, more for runs under ~0.3 s, see runs_for(); the same
for Torch-Pruning), CPU latency at batch 1 before/after, export ok. With torch-pruning
importable (the `bench` extra), Torch-Pruning runs at the same ratio on the same model beside
ours. Each tool
is timed after one untimed warm-up run of its own on a small model (resnet18 at 64 px), so
neither pays one-time costs (imports, first calls) in its figure, and after a gc.collect(), so
neither pays for garbage the other left.

Each model runs in its own subprocess (a crash, a timeout or running out of memory costs one
row, never the sweep); rows are appended to a JSON-lines file as they finish, so the sweep is
resumable (models already there are skipped unless --redo).

    OMP_NUM_THREADS=2 python benchmarks/shrink_sweep.py                      # all 80
    OMP_NUM_THREADS=2 python benchmarks/shrink_sweep.py --models resnet18,vit_b_16
    OMP_NUM_THREADS=2 python benchmarks/shrink_sweep.py --limit 10 --no-tp
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

ROWS = HERE / "results" / "shrink_sweep.jsonl"


def _prepare(model):
    """Random (not zero) weights everywhere, random BN statistics: torchvision zero-initialises
    some heads (ViT), which would make every model output the same and any check vacuous."""
    import torch
    from torch import nn
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            for name, p in m.named_parameters(recurse=False):
                if p.dim() >= 2 and not p.any():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def macs(model, x) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() // 2


def latency(model, x, reps: int = 5) -> float:
    """Median seconds per forward at batch 1 (after warm-up)."""
    import torch
    times = []
    with torch.no_grad():
        for _ in range(2):
            model(x)
        deadline = time.perf_counter() + 10
        for _ in range(reps):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
            if time.perf_counter() > deadline and len(times) >= 3:
                break
    return statistics.median(times)


def _final_layer(model):
    from torch import nn
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = m
    return last


def _tp_prune(model, x, ratio: float) -> None:
    import torch_pruning as tp
    imp = (getattr(tp.importance, "GroupMagnitudeImportance", None) or tp.importance.MagnitudeImportance)(p=2)
    Pruner = getattr(tp.pruner, "MetaPruner", None) or tp.pruner.BasePruner
    pruner = Pruner(model, x, importance=imp, pruning_ratio=ratio, ignored_layers=[_final_layer(model)])
    pruner.step()


def _ours(model, x, ratio: float, round_to: int):
    """What a user writes: compress(model, [ChannelPrune, Shrink]). Capture runs one forward
    for shapes, ChannelPrune none, Shrink the masked and the shrunk model once each to verify
    itself. Returns (shrunk model, seconds)."""
    import surgery
    from passes import ChannelPrune, Shrink
    gc.collect()  # both tools start with no garbage pending (see run_tp)
    t = time.perf_counter()
    small = surgery.compress(model, [ChannelPrune(ratio=ratio, round_to=round_to), Shrink()], (x,))
    return small, time.perf_counter() - t


def warm_up(tool: str, ratio: float) -> None:
    """One untimed run of `tool` ("ours" or "tp") on a small model, so that neither tool's
    timing pays its one-time costs (imports, first calls, lazily built tables)."""
    import torch
    import torchvision
    model = _prepare(torchvision.models.get_model("resnet18", weights=None))
    x = torch.randn(1, 3, 64, 64)
    if tool == "tp":
        _tp_prune(model, x, ratio)
    else:
        _ours(model, x, ratio, 1)


def runs_for(first_seconds: float, repeats: int) -> int:
    """Timed runs for a tool whose first timed run took `first_seconds`: `repeats`, and more
    for fast runs, whose medians a stray slowdown of this shared machine moves most (runs of
    0.1 s vary by 20-30%): enough to cover about a second, at most 3 x `repeats`. The same
    rule for both tools, each by its own first run."""
    return max(repeats, min(3 * repeats, math.ceil(1.0 / max(first_seconds, 1e-3))))


def run_tp(name: str, ratio: float, x, repeats: int = 1) -> dict:
    import torch
    import torchvision
    warm_up("tp", ratio)
    times = []
    while len(times) < (runs_for(times[0], repeats) if times else 1):  # a fresh model every run (TP prunes in place)
        model = None
        model = _prepare(torchvision.models.get_model(name, weights=None))
        ref_shape = model(x).shape
        # a full collection in a process holding torch and torchvision scans ~340k objects (~0.15 s
        # here): start both tools' timed runs from a clean collector, so neither pays for the other
        gc.collect()
        t = time.perf_counter()
        _tp_prune(model, x, ratio)
        times.append(time.perf_counter() - t)
    with torch.no_grad():
        out = model(x)
    ok = out.shape == ref_shape
    return {"tp_time": statistics.median(times), "tp_times": times,
            "tp_params": sum(p.numel() for p in model.parameters()), "tp_macs": macs(model, x),
            "tp_latency": latency(model, x), "tp_ok": ok,
            "tp_error": None if ok else f"output shape {tuple(out.shape)} != {tuple(ref_shape)}"}


TP_MEMORY_GB = 6  # Torch-Pruning needs > 16 GB on swin: keep it from taking the machine down


def _limit_memory(extra_gb: float) -> None:
    """Cap this process's address space at its current size plus `extra_gb`."""
    try:
        import resource
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        cap = vm + int(extra_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    except (ImportError, OSError, StopIteration, ValueError):
        pass


def run_one(name: str, ratio: float, size: int, round_to: int, tp_too: bool, repeats: int = 1) -> dict:
    import torch
    import torchvision

    import surgery
    from passes import ChannelPrune
    from surgery.verify import max_rel_diff, run_eval
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    row: dict = {"model": name}
    model = _prepare(torchvision.models.get_model(name, weights=None))
    x = torch.randn(1, 3, size, size)
    x2 = torch.randn(1, 3, size, size)
    row["params_before"] = sum(p.numel() for p in model.parameters())
    row["macs_before"] = macs(model, x)
    row["latency_before"] = latency(model, x)
    warm_up("ours", ratio)
    times = []
    while len(times) < (runs_for(times[0], repeats) if times else 1):
        small = None
        small, t = _ours(model, x, ratio, round_to)
        times.append(t)
    row["surgery_time"], row["surgery_times"] = statistics.median(times), times
    masked = surgery.compress(model, [ChannelPrune(ratio=ratio, round_to=round_to)], (x,))  # the same masks
    row["verify_time"] = surgery.shrink_report(small).verify_seconds
    row["rel_error"] = max_rel_diff(run_eval(masked, (x2,)), run_eval(small, (x2,)))
    row["exact"] = row["rel_error"] < 1e-4
    row["params_after"] = sum(p.numel() for p in small.parameters())
    row["macs_after"] = macs(small, x)
    row["latency_after"] = latency(small, x)
    del masked
    with tempfile.TemporaryDirectory() as d:
        try:
            surgery.export(small, Path(d) / f"{name}.pt", (x2,))
            row["export"] = True
        except Exception as e:
            row["export"], row["export_error"] = False, str(e)[:300]
    print("ROW " + json.dumps(row), flush=True)  # ours is safe even if Torch-Pruning hangs below
    if tp_too:
        del small
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            return row
        row["tp_ok"], row["tp_error"] = False, "did not finish"
        print("ROW " + json.dumps(row), flush=True)
        _limit_memory(TP_MEMORY_GB)
        try:
            row.update(run_tp(name, ratio, x, repeats))
        except MemoryError:
            row.update(tp_ok=False, tp_error=f"out of memory (limit {TP_MEMORY_GB} GB more)")
        except Exception as e:
            row.update(tp_ok=False, tp_error=f"{type(e).__name__}: {str(e)[:200]}")
    return row


def _fmt(v, kind):
    if v is None:
        return "-"
    if kind == "M":
        return f"{v / 1e6:.1f}"
    if kind == "G":
        return f"{v / 1e9:.2f}"
    if kind == "ms":
        return f"{v * 1e3:.0f}"
    if kind == "s":
        return f"{v:.1f}"
    return str(v)


def ratio_str(rows) -> str:
    return "1.6.1"


def table(rows: list[dict]) -> tuple[str, str]:
    from _report import markdown_table
    tp = any("tp_time" in r or "tp_ok" in r for r in rows)
    heads = ["model", "exact", "rel. error", "params M", "MACs G", "surgery s (verify s)", "latency ms (b1)",
             "export"]
    if tp:
        heads += ["TP s", "TP params M", "TP MACs G", "TP latency ms", "TP ok"]
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["model"], "FAIL", r["error"][:80]] + ["-"] * (len(heads) - 3))
            continue
        line = [r["model"], "yes" if r["exact"] else "NO", f"{r['rel_error']:.1e}",
                f"{_fmt(r['params_before'], 'M')} -> {_fmt(r['params_after'], 'M')}",
                f"{_fmt(r['macs_before'], 'G')} -> {_fmt(r['macs_after'], 'G')}",
                f"{_fmt(r['surgery_time'], 's')} ({_fmt(r.get('verify_time'), 's')})",
                f"{_fmt(r['latency_before'], 'ms')} -> {_fmt(r['latency_after'], 'ms')}",
                "yes" if r.get("export") else "NO"]
        if tp:
            ok = r.get("tp_ok")
            line += [_fmt(r.get("tp_time"), "s"), _fmt(r.get("tp_params"), "M"), _fmt(r.get("tp_macs"), "G"),
                     _fmt(r.get("tp_latency"), "ms"),
                     "yes" if ok else ("-" if ok is None else f"NO ({(r.get('tp_error') or '')[:40]})")]
        out.append(line)
    good = [r for r in rows if "error" not in r]
    n_exact = sum(1 for r in good if r["exact"])
    n_exp = sum(1 for r in good if r.get("export"))
    n_small = sum(1 for r in good if r["params_after"] < r["params_before"])
    summary = (f"{len(rows)} models: {n_exact} exact, {n_exp} exported, {n_small} smaller, "
               f"{len(rows) - len(good)} failed.")
    if good:
        summary += (f" Median surgery time {statistics.median(r['surgery_time'] for r in good):.1f} s; "
                    f"median params kept {statistics.median(r['params_after'] / r['params_before'] for r in good):.0%}, "
                    f"MACs kept {statistics.median(r['macs_after'] / r['macs_before'] for r in good):.0%}.")
    both = [r for r in good if r.get("tp_ok")]
    if both:
        faster = sum(1 for r in both if r["surgery_time"] < r["tp_time"])
        faster_nv = sum(1 for r in both if "verify_time" in r and r["surgery_time"] - r["verify_time"] < r["tp_time"])
        summary += (f" Torch-Pruning {ratio_str(rows)} worked on {len(both)}/{len(good)}; surgery took less wall "
                    f"time on {faster}/{len(both)} of those ({faster_nv}/{len(both)} not counting its own "
                    "verification runs, which Torch-Pruning does not do).")
    return markdown_table(heads, out), summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated names (default: all classification models)")
    ap.add_argument("--limit", type=int, default=0, help="at most this many models (after --models)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per model")
    ap.add_argument("--redo", action="store_true", help="rerun models already in the rows file")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning even when installed")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per tool and model, more for fast ones (the median is reported)")
    ap.add_argument("--rows", default=str(ROWS))
    ap.add_argument("--table-only", action="store_true", help="write the table from the rows file, run nothing")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        row = run_one(args.one, args.ratio, args.size, args.round_to, not args.no_tp, args.repeats)
        print("ROW " + json.dumps(row), flush=True)
        return
    import torchvision
    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    names = list(dict.fromkeys(n for n in names if n))
    if args.limit:
        names = names[:args.limit]
    rows_path = Path(args.rows)
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["model"]] = r
    from tqdm import tqdm
    for name in tqdm([] if args.table_only else names, desc="shrink sweep"):
        if name in done and not args.redo:
            continue
        cmd = [sys.executable, __file__, "--one", name, "--ratio", str(args.ratio), "--size", str(args.size),
               "--round-to", str(args.round_to), "--repeats", str(args.repeats)] + (["--no-tp"] if args.no_tp else [])
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            out, err, code = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err, code = f"timeout after {args.timeout} s", "timeout"
        rows = [ln[4:] for ln in out.splitlines() if ln.startswith("ROW ")]
        if rows:
            row = json.loads(rows[-1])
            if code == "timeout" and row.get("tp_error") == "did not finish":
                row["tp_error"] = f"timeout (over {args.timeout} s in all)"
        else:
            tail = (err.strip().splitlines() or ["no output"])[-1]
            row = {"model": name, "error": f"exit {code}: {tail}"}
        done[name] = row
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tqdm.write(f"{name}: " + ("FAIL " + row["error"] if "error" in row else
                                  f"exact={row['exact']} err={row['rel_error']:.1e} "
                                  f"params {row['params_after'] / row['params_before']:.2f} "
                                  f"t={row['surgery_time']:.1f}s export={row.get('export')}"))
    ordered = [done[n] for n in names if n in done]
    tab, summary = table(ordered)
    from _report import write_result
    path = write_result("shrink_sweep", f"Shrink sweep: ChannelPrune(ratio={args.ratio}) -> Shrink -> export",
                        "OMP_NUM_THREADS=2 python " + " ".join(["benchmarks/shrink_sweep.py", *sys.argv[1:]]),
                        tab, summary + f"\n\nInput 1x3x{args.size}x{args.size}; weights random (weights=None, "
                        "zero-initialised tensors re-drawn, BN statistics random); exact = max rel. error < 1e-4 "
                        "between the masked and the shrunk model on a fresh input.")
    print(summary)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
