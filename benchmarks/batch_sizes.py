"""Masked and shrunk models at another batch size than the one they were captured with.

Capture, ChannelPrune and Shrink see one example (the sweeps' inputs: batch 1 for torchvision,
timm and video, the Hugging Face set's own batch); Shrink verifies itself there. A user then runs
the model on other batches. Every model of the shrink sweeps is masked (``ChannelPrune(0.5)``)
and shrunk at its example, then both run at `--factor` times its batch (fresh random floats,
integer inputs repeated): they must run, and agree within 1e-4 relative.

    python benchmarks/batch_sizes.py                      # all four sweeps
    python benchmarks/batch_sizes.py --family timm --models resnet,byoanet/halonet
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _report import markdown_table, write_result  # noqa: E402
from _sweep_models import model_names, subject  # noqa: E402

FAMILIES = ("torchvision", "timm", "video", "hf")


def grow(v: Any, k: int) -> Any:
    """Inputs with `k` times the batch: floats drawn afresh, integers (token ids, masks) repeated."""
    if isinstance(v, torch.Tensor) and v.dim() > 0:
        if v.is_floating_point():
            return torch.randn((v.shape[0] * k, *v.shape[1:]), dtype=v.dtype)
        return v.repeat(k, *([1] * (v.dim() - 1)))
    if isinstance(v, (tuple, list)):
        return type(v)(grow(a, k) for a in v)
    if isinstance(v, dict):
        return {a: grow(b, k) for a, b in v.items()}
    return v


def _batch(v: Any) -> int | None:
    if isinstance(v, torch.Tensor) and v.dim() > 0:
        return int(v.shape[0])
    items = v.values() if isinstance(v, dict) else v if isinstance(v, (tuple, list)) else []
    return next((b for b in map(_batch, items) if b is not None), None)


def one(family: str, name: str, factor: int) -> list:
    """[family, model, example batch, batch run, outcome, max rel. error]."""
    import surgery
    from _hf_models import output_tensors
    from passes import ChannelPrune, Shrink
    sub = subject(family, name, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = surgery.compress(sub.model, [ChannelPrune(0.5)], sub.inputs)
        small = surgery.compress(masked, [Shrink()], sub.inputs)
    x = grow(sub.inputs, factor)
    args, kwargs = (x, {}) if isinstance(x, tuple) else ((), x)
    b0, b1 = _batch(sub.inputs), _batch(x)
    outs = []
    for label, model in (("masked", masked), ("shrunk", small)):
        try:
            with torch.no_grad():
                outs.append(output_tensors(model(*args, **kwargs)))
        except Exception as e:  # noqa: BLE001 - the row names what failed
            return [family, name, b0, b1, f"{label} fails: {type(e).__name__}: {str(e)[:160]}", "-"]
    err = max(((p - q).abs().max() / (p.abs().max() + 1e-12)).item() for p, q in zip(*outs))
    return [family, name, b0, b1, "runs, agrees" if err < 1e-4 else "runs, DIFFERS", f"{err:.1e}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", action="append", choices=FAMILIES, help="repeatable (default: all four)")
    ap.add_argument("--models", default="", help="comma-separated names (timm: family names)")
    ap.add_argument("--factor", type=int, default=3, help="the batch to run, as a multiple of the example's")
    args = ap.parse_args()
    from tqdm import tqdm
    rows = []
    for family in args.family or FAMILIES:
        for name in tqdm(model_names(family, args.models), desc=f"batch sizes ({family})"):
            try:
                rows.append(one(family, name, args.factor))
            except Exception as e:  # noqa: BLE001 - a model that does not build or prune is named
                rows.append([family, name, "-", "-", f"not pruned: {type(e).__name__}: {str(e)[:160]}", "-"])
            tqdm.write(" | ".join(map(str, rows[-1])))
    good = [r for r in rows if r[4] == "runs, agrees"]
    by_family = ", ".join(f"{f}: {sum(r[0] == f for r in good)}/{sum(r[0] == f for r in rows)}"
                          for f in dict.fromkeys(r[0] for r in rows))
    summary = (f"**{len(good)}/{len(rows)} masked and shrunk models run at {args.factor}x their example's batch "
               f"and agree** ({by_family}).")
    print(summary)
    table = markdown_table(["family", "model", "example batch", "batch run", "outcome", "max rel. error"], rows)
    write_result("batch_sizes", "Masked and shrunk models at another batch size", None, table,
                 summary + " Each model masked by ChannelPrune(0.5) and shrunk at its sweep's example inputs; "
                 "floats drawn afresh at the larger batch, integer inputs repeated.")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
