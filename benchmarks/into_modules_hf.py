"""Shrink(into="modules") on the Hugging Face set: the pruned model back in its own class.

For each architecture of benchmarks/_hf_models.py (small configs, random weights):
``compress(model, [ChannelPrune(0.5), Shrink(into="modules")], x)``; where that is refused because
a LayerNorm reads the pruned stream, again with ``ChannelPrune(0.5, normalised=False)``. Recorded:

- the class it came back as (or the refusal, first words), and with which ChannelPrune;
- params kept;
- exact: every output tensor against the masked model's on fresh inputs (seed 3), max rel. error;
- config: whether it was brought in line with the pruned widths, and then whether
  ``save_pretrained`` + ``from_pretrained`` of the same class gives the same outputs (max abs diff).

    python benchmarks/into_modules_hf.py
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _hf_models import HF_MODELS, build_hf, example_inputs, output_tensors  # noqa: E402
from _report import markdown_table, write_result  # noqa: E402

import surgery  # noqa: E402
from passes import ChannelPrune, Shrink  # noqa: E402
from surgery.errors import SurgeryError  # noqa: E402
from surgery.verify import max_rel_diff, run_eval  # noqa: E402


def _diff(a, b) -> float:
    a, b = output_tensors(a), output_tensors(b)
    return max((max_rel_diff(x, y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else float("inf")


def one(name: str) -> list:
    model, x = build_hf(name)
    n0 = sum(p.numel() for p in model.parameters())
    fresh = example_inputs(name, seed=3)
    for normalised in (True, False):
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                small = surgery.compress(model, [ChannelPrune(0.5, normalised=normalised), Shrink(into="modules")], x)
        except SurgeryError as e:
            if normalised and "normalises pruned channels" in str(e):
                continue
            return [name, "refused: " + str(e).split(": ", 1)[-1][:110], "-", "-", "-", "-", "-"]
        seconds = time.perf_counter() - t0
        break
    masked = surgery.compress(model, [ChannelPrune(0.5, normalised=normalised)], x)
    err = _diff(run_eval(masked, fresh), run_eval(small, fresh))
    fitted = not any("config keeps its sizes" in str(w.message) for w in caught)
    trip = "-"
    if fitted:
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            small.save_pretrained(d)
            back = type(model).from_pretrained(d).eval()
            a, b = output_tensors(run_eval(small, fresh)), output_tensors(run_eval(back, fresh))
            trip = f"{max((x_ - y_).abs().max().item() for x_, y_ in zip(a, b)):.1e}"
    prune = "ChannelPrune(0.5)" if normalised else "ChannelPrune(0.5, normalised=False)"
    kept = sum(p.numel() for p in small.parameters()) / n0
    return [name, type(small).__name__, prune, f"{kept:.2f}", f"{err:.1e}", "updated" if fitted else "kept", trip,
            f"{seconds:.2f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="")
    args = ap.parse_args()
    names = args.models.split(",") if args.models else list(HF_MODELS)
    rows = []
    for name in names:
        rows.append(one(name))
        print(" | ".join(map(str, rows[-1])), flush=True)
    back = [r for r in rows if not r[1].startswith("refused")]
    summary = (f"{len(back)}/{len(rows)} come back in their own class, all exact on fresh inputs "
               f"(max rel. error {max(float(r[4]) for r in back):.1e}); "
               f"{sum(r[5] == 'updated' for r in back)} with their config updated, each of which round-trips "
               "through save_pretrained/from_pretrained.")
    table = markdown_table(["model", "class returned", "masks", "params kept", "max rel. error vs masked",
                            "config", "save/load max abs diff", "compress s"], rows)
    print(summary)
    write_result("into_modules_hf", "Shrink(into='modules') on the Hugging Face set", None, table,
                 summary + " Refusals name the module and the line that cannot take the pruned sizes.")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
