"""ChannelPrune(ratio) -> Shrink -> export on every torchvision classification model, on one
timm model per architecture family, and on the Hugging Face transformers set.

One row per model: exact (max rel. error < 1e-4 on a fresh input, masked vs shrunk), params
and MACs before/after, surgery wall time (compress(model, [ChannelPrune, Shrink]), verification
included; the median of --repeats runs, more for runs under ~0.3 s, see runs_for(); the same
for Torch-Pruning), CPU latency at batch 1 before/after, and export to TorchScript, .pt2 and
ONNX, each reloaded and verified (surgery.export). With torch-pruning
importable (the `bench` extra), Torch-Pruning runs at the same ratio on the same model beside
ours. Each tool
is timed after one untimed warm-up run of its own on a small model (resnet18 at 64 px; for
--family hf the small BERT), so neither pays one-time costs (imports, first calls) in its
figure, and after a gc.collect(), so neither pays for garbage the other left.

--family picks the models (rows file and table under benchmarks/results/):

- torchvision (default): every classification model of torchvision.models (80), input
  1x3x224x224 (--size); shrink_sweep.jsonl and shrink_sweep.md.
- timm: one model per timm architecture family (benchmarks/_timm_models.py: a timm model module
  split by model-name stem, about 190 families; per family the smallest-looking model by a
  fixed name rule that builds on CPU with pretrained=False; a family none of whose models builds
  is recorded as skipped), input its pretrained_cfg["input_size"], brought down to --size (224)
  per side where the model runs on that; shrink_sweep_timm.jsonl and shrink_sweep_timm.md.
- video: torchvision's video classifiers (9), clips of 8x112x112 (16x224x224 for MViT, S3D, Swin3D);
  shrink_sweep_video.jsonl and shrink_sweep_video.md.
- hf: the 26 Hugging Face architectures of benchmarks/_hf_models.py (small configs, random
  weights, keyword inputs); exact compares every output tensor on fresh inputs (seed 1);
  shrink_sweep_hf.jsonl and shrink_sweep_hf.md.

Torch-Pruning gets what its own examples give it: a GroupMagnitudeImportance(p=2) MetaPruner
at the ratio, the final classifier / LM head ignored; for timm and hf its num_heads map (each
q/k/v projection -> its head count) and, after pruning, the attention modules' head count and
size set from the pruned projections (its examples do this by hand). timm keeps its default
(head dimensions pruned, as in its timm example); hf prunes whole heads at the ratio and keeps
head dimensions (its BERT and LLM examples), gets an output_transform that returns every tensor
of the ModelOutput, and, for a backbone with no head, also has the layers that produce the
outputs ignored (both tools keep the outputs' shapes). Torch-Pruning works on a model when its
pruned model runs and returns outputs of the original shapes; its error is recorded otherwise.
It loops for good on some models (transformers' Llama family, timm's BoTNet): each of its
pruning runs gets --tp-timeout seconds (timm 120, hf 60; torchvision only --timeout).

Each model runs in its own subprocess (a crash, a timeout or running out of memory costs one
row, never the sweep); rows are appended to a JSON-lines file as they finish, so the sweep is
resumable (models already there are skipped unless --redo).

    OMP_NUM_THREADS=2 python benchmarks/shrink_sweep.py                      # all 80
    OMP_NUM_THREADS=2 python benchmarks/shrink_sweep.py --models resnet18,vit_b_16
    OMP_NUM_THREADS=2 python benchmarks/shrink_sweep.py --limit 10 --no-tp
    OMP_NUM_THREADS=2 python benchmarks/shrink_sweep.py --family timm        # every family
    OMP_NUM_THREADS=2 python benchmarks/shrink_sweep.py --family timm --models resnet,vision_transformer/vit
    OMP_NUM_THREADS=2 python benchmarks/shrink_sweep.py --family hf          # all 26
    python benchmarks/shrink_sweep.py --family timm --list                   # families, nothing run
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

from _hf_models import output_tensors  # noqa: E402
from _sweep_models import Subject, latency, macs, model_names, prepare, subject  # noqa: E402
from _sweep_report import notes, table  # noqa: E402
from _torch_pruning import TP_MEMORY_GB, limit_memory, time_limit, tp_prune  # noqa: E402

from surgery.calling import call  # noqa: E402


ROWS = HERE / "results" / "shrink_sweep.jsonl"
FAMILIES = ("torchvision", "timm", "hf", "video")
BUDGET = 0.5  # target_macs of the budget column: the shrunk model's MACs over the dense model's
EXPORT_FORMATS = ("pt", "pt2", "onnx")  # TorchScript, torch.export, ONNX (run by ONNX Runtime)

def result_name(family: str, attention: str = "heads") -> str:
    """The results file stem of `family`: shrink_sweep (torchvision), shrink_sweep_timm, shrink_sweep_hf;
    with ``attention="head_dims"``, ..._head_dims."""
    stem = "shrink_sweep" if family == "torchvision" else f"shrink_sweep_{family}"
    return stem if attention == "heads" else f"{stem}_{attention}"


def _ours(model, x, ratio: float, round_to: int, attention: str = "heads"):
    """What a user writes: compress(model, [ChannelPrune, Shrink]). Capture runs one forward
    for shapes, ChannelPrune none, Shrink the masked and the shrunk model once each to verify
    itself. `x`: the example inputs (a tuple, or a dict of keyword inputs). Returns (shrunk
    model, seconds)."""
    import surgery
    from passes import ChannelPrune, Shrink
    gc.collect()  # both tools start with no garbage pending (see run_tp)
    t = time.perf_counter()
    small = surgery.compress(model, [ChannelPrune(ratio=ratio, round_to=round_to, attention=attention), Shrink()], x)
    return small, time.perf_counter() - t


def _tp_family(family: str) -> str:
    """Torch-Pruning's settings for `family`: video models get the torchvision ones."""
    return "torchvision" if family == "video" else family


def warm_up(tool: str, ratio: float, family: str = "torchvision") -> None:
    """One untimed run of `tool` ("ours" or "tp") on a small model, so that neither tool's
    timing pays its one-time costs (imports, first calls, lazily built tables): resnet18 at 64 px
    (timm's for --family timm), the small BERT for --family hf."""
    import torch
    if family == "hf":
        from _hf_models import build_hf
        model, x = build_hf("bert")
        model = prepare(model, vectors=True)
    else:
        if family == "timm":
            import timm
            model = prepare(timm.create_model("resnet18", pretrained=False), vectors=True)
        else:
            import torchvision
            model = prepare(torchvision.models.get_model("resnet18", weights=None))
        x = (torch.randn(1, 3, 64, 64),)
    if tool == "tp":
        tp_prune(model, x[0] if family in ("torchvision", "video") else x, ratio, _tp_family(family))
    else:
        _ours(model, x, ratio, 1)


def runs_for(first_seconds: float, repeats: int) -> int:
    """Timed runs for a tool whose first timed run took `first_seconds`: `repeats`, and more
    for fast runs, whose medians a stray slowdown of this shared machine moves most (runs of
    0.1 s vary by 20-30%): enough to cover about a second, at most 3 x `repeats`. The same
    rule for both tools, each by its own first run."""
    return max(repeats, min(3 * repeats, math.ceil(1.0 / max(first_seconds, 1e-3))))


def run_tp(sub: Subject, ratio: float, family: str = "torchvision", repeats: int = 1,
           limit: float = 0) -> dict:
    """Torch-Pruning on fresh copies of `sub`'s model (the median of its timed runs, see
    runs_for), each pruning run within `limit` seconds (0: no limit)."""
    import torch
    warm_up("tp", ratio, family)
    x = sub.inputs[0] if family in ("torchvision", "video") else sub.inputs
    times = []
    while len(times) < (runs_for(times[0], repeats) if times else 1):  # a fresh model every run (TP prunes in place)
        model = None
        model = sub.rebuild()
        with torch.no_grad():
            ref_shapes = [t.shape for t in output_tensors(call(model, sub.inputs))]
        # a full collection in a process holding torch and torchvision scans ~340k objects (~0.15 s
        # here): start both tools' timed runs from a clean collector, so neither pays for the other
        gc.collect()
        t = time.perf_counter()
        with time_limit(limit):
            tp_prune(model, x, ratio, _tp_family(family))
        times.append(time.perf_counter() - t)
    with torch.no_grad():
        shapes = [t.shape for t in output_tensors(call(model, sub.inputs))]
    ok = shapes == ref_shapes
    return {"tp_time": statistics.median(times), "tp_times": times,
            "tp_params": sum(p.numel() for p in model.parameters()), "tp_macs": macs(model, sub.inputs),
            "tp_latency": latency(model, sub.inputs), "tp_ok": ok,
            "tp_error": None if ok else _shape_error(shapes, ref_shapes)}


def _shape_error(shapes: list, ref_shapes: list) -> str:
    """How the pruned model's output shapes differ from the original's: the one output's shape,
    or each output (by index) whose shape changed."""
    if len(shapes) == len(ref_shapes) == 1:
        return f"output shape {tuple(shapes[0])} != {tuple(ref_shapes[0])}"
    if len(shapes) != len(ref_shapes):
        return f"{len(shapes)} outputs != {len(ref_shapes)}"
    return "; ".join(f"output {i} shape {tuple(a)} != {tuple(b)}"
                     for i, (a, b) in enumerate(zip(shapes, ref_shapes)) if a != b)


def _error(e: BaseException) -> str:
    """`e` in one line of at most 300 characters."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


def run_one(name: str, ratio: float, size: int, round_to: int, tp_too: bool, repeats: int = 1,
            family: str = "torchvision", tp_limit: float = 0, attention: str = "heads") -> dict:
    import torch

    import surgery
    from passes import ChannelPrune, Shrink
    from surgery.verify import max_rel_diff, run_eval
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    row: dict = {"model": name}
    if family == "timm":
        from _timm_models import NoModelBuilds
        try:
            sub = subject(family, name, size)
        except NoModelBuilds as e:
            row["skipped"] = str(e)[:300]
            return row
    else:
        sub = subject(family, name, size)
    row.update(sub.info)
    model, x, x2 = sub.model, sub.inputs, sub.fresh
    row["params_before"] = sum(p.numel() for p in model.parameters())
    small = None
    try:
        row["macs_before"] = macs(model, x)
        row["latency_before"] = latency(model, x)
        warm_up("ours", ratio, family)
        times = []
        while len(times) < (runs_for(times[0], repeats) if times else 1):
            small = None
            small, t = _ours(model, x, ratio, round_to, attention)
            times.append(t)
        row["surgery_time"], row["surgery_times"] = statistics.median(times), times
        masked = surgery.compress(model, [ChannelPrune(ratio=ratio, round_to=round_to, attention=attention)],
                                  x)  # the same masks
        row["verify_time"] = surgery.shrink_report(small).verify_seconds
        row["rel_error"] = max_rel_diff(output_tensors(run_eval(masked, x2)), output_tensors(run_eval(small, x2)))
        row["exact"] = row["rel_error"] < 1e-4
        row["params_after"] = sum(p.numel() for p in small.parameters())
        row["macs_after"] = macs(small, x)
        row["latency_after"] = latency(small, x)
        del masked
    except Exception as e:  # our failure is data: the row says why, Torch-Pruning still runs
        row["error"] = _error(e)
    if "error" not in row:  # the budget: ChannelPrune(target_macs=BUDGET) instead of the ratio
        try:
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                budgeted = surgery.compress(model, [ChannelPrune(target_macs=BUDGET, round_to=round_to,
                                                                 attention=attention), Shrink()], x)
            row["budget_macs"] = macs(budgeted, x) / row["macs_before"]
            if any("cannot be reached" in str(w.message) for w in said):
                row["budget_floor"] = True  # the prunable groups cannot get below it
            del budgeted
        except Exception as e:
            row["budget_error"] = _error(e)
    if "error" not in row:
        # each format written, reloaded as deployment reloads it and verified (.pt2 and .onnx at a
        # second batch size too); TorchScript and the exporters take tensors: a keyword flag
        # (use_cache=False) stays what capture fixed
        tensors = {k: v for k, v in x2.items() if isinstance(v, torch.Tensor)} if isinstance(x2, dict) else x2
        row["exports"], row["export_errors"], row["export_seconds"] = {}, {}, {}
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for fmt in EXPORT_FORMATS:
                t = time.perf_counter()
                try:
                    surgery.export(small, Path(d) / f"{name.replace('/', '_')}.{fmt}", tensors)
                    row["exports"][fmt] = True
                except Exception as e:
                    row["exports"][fmt], row["export_errors"][fmt] = False, str(e)[:300]
                row["export_seconds"][fmt] = round(time.perf_counter() - t, 2)
        row["export"] = all(row["exports"].values())
    print("ROW " + json.dumps(row), flush=True)  # ours is safe even if Torch-Pruning hangs below
    if tp_too:
        del small
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            return row
        row["tp_ok"], row["tp_error"] = False, "did not finish"
        print("ROW " + json.dumps(row), flush=True)
        limit_memory(TP_MEMORY_GB)
        try:
            row.update(run_tp(sub, ratio, family, repeats, tp_limit))
        except MemoryError:
            row.update(tp_ok=False, tp_error=f"out of memory (limit {TP_MEMORY_GB} GB more)")
        except Exception as e:
            row.update(tp_ok=False, tp_error=f"{type(e).__name__}: {str(e)[:200]}")
    return row


def _progress(name: str, row: dict) -> str:
    """One line per finished model."""
    if "skipped" in row:
        return f"{name}: SKIPPED {row['skipped']}"
    if "error" in row:
        return f"{name}: FAIL " + row["error"] + (f" (TP ok={row['tp_ok']})" if "tp_ok" in row else "")
    line = (f"{name}: exact={row['exact']} err={row['rel_error']:.1e} "
            f"params {row['params_after'] / row['params_before']:.2f} "
            f"t={row['surgery_time']:.1f}s export={row.get('export')}")
    if "arch" in row:
        line = f"{name} ({row['arch']} @{row['input_size'][1]}): " + line.split(": ", 1)[1]
    if "tp_ok" in row:
        line += f" TP ok={row['tp_ok']}" + (f" params {row['tp_params'] / row['params_before']:.2f}"
                                             if row.get("tp_params") else f" ({row.get('tp_error')})")
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=FAMILIES, default="torchvision",
                    help="which models: torchvision classification, one timm model per family, Hugging Face")
    ap.add_argument("--models", default="", help="comma-separated names (timm: family names; default: all)")
    ap.add_argument("--limit", type=int, default=0, help="at most this many models (after --models)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--attention", choices=("heads", "head_dims"), default="heads",
                    help="ChannelPrune's attention units (head_dims: tables named ..._head_dims)")
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--size", type=int, default=224,
                    help="input side (timm: the largest side, where the model runs on it)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per model")
    ap.add_argument("--tp-timeout", type=float, default=None,
                    help="seconds per Torch-Pruning pruning run (default: timm 120, hf 60; 0, torchvision's "
                         "default: only --timeout)")
    ap.add_argument("--redo", action="store_true", help="rerun models already in the rows file")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning even when installed")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs per tool and model, more for fast ones (the median is reported)")
    ap.add_argument("--rows", default=None, help="JSON-lines rows file (default benchmarks/results/<table name>.jsonl)")
    ap.add_argument("--table-only", action="store_true", help="write the table from the rows file, run nothing")
    ap.add_argument("--no-write", action="store_true", help="do not write the table into benchmarks/results/")
    ap.add_argument("--list", action="store_true",
                    help="print the models (timm: families and representatives), run nothing")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tp_timeout is None:  # TP loops for good on some (Llama, BoTNet); it takes < 30 s on the rest
        args.tp_timeout = {"torchvision": 0, "timm": 120, "hf": 60, "video": 0}[args.family]
    if args.one:
        row = run_one(args.one, args.ratio, args.size, args.round_to, not args.no_tp, args.repeats, args.family,
                      args.tp_timeout, args.attention)
        print("ROW " + json.dumps(row), flush=True)
        return
    names = model_names(args.family, args.models)
    if args.limit:
        names = names[:args.limit]
    if args.list:
        reps = {}
        if args.family == "timm":
            from _timm_models import families
            reps = families()
        for n in names:
            print(f"{n:42s} {reps[n][0]:40s} ({len(reps[n])} models)" if n in reps else n)
        print(f"{len(names)} {'families' if args.family == 'timm' else 'models'}")
        return
    rows_path = Path(args.rows) if args.rows else HERE / "results" / f"{result_name(args.family, args.attention)}.jsonl"
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["model"]] = r
    from tqdm import tqdm
    for name in tqdm([] if args.table_only else names, desc=f"shrink sweep ({args.family})"):
        if name in done and not args.redo:
            continue
        cmd = [sys.executable, __file__, "--one", name, "--family", args.family, "--ratio", str(args.ratio),
               "--size", str(args.size), "--round-to", str(args.round_to), "--repeats", str(args.repeats),
               "--tp-timeout", str(args.tp_timeout), "--attention", args.attention] + \
            (["--no-tp"] if args.no_tp else [])
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
        tqdm.write(_progress(name, row))
    # a --models run updates those rows; the table keeps every model of the rows file
    everything = list(dict.fromkeys([*model_names(args.family), *names])) if args.models else names
    ordered = [done[n] for n in everything if n in done]
    tab, text = table(ordered, args.family)
    print(text)
    if args.no_write:
        return
    from _report import write_result
    which = {"torchvision": "", "timm": " (timm, one model per architecture family)",
             "hf": " (Hugging Face transformers)", "video": " (torchvision video classifiers)"}[args.family]
    command = " ".join(["python", "benchmarks/shrink_sweep.py", *sys.argv[1:]])  # threads, taskset, commit: _report
    units = "" if args.attention == "heads" else f", attention={args.attention!r}"
    path = write_result(result_name(args.family, args.attention),
                        f"Shrink sweep{which}: ChannelPrune(ratio={args.ratio}{units}) -> Shrink -> export",
                        command, tab, text + "\n\n" + notes(args.family, args.size),
                        then=bool(args.models or args.table_only))  # rows of earlier runs are in the table too
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
