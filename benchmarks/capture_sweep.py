"""Capture every torchvision model and check the captured module is exact.

For each model in ``torchvision.models.list_models()`` (classification, segmentation, video,
detection, optical flow; weights=None, eval mode): capture with example inputs, run eager and
captured on the same input, and require max abs diff == 0. One row per model, then the summary
``captured K/N exact``. Classification, segmentation and video models must be captured whole
(nothing opaque); detection and optical-flow models keep their data-dependent parts opaque.

The Hugging Face section (``--family hf``) builds 26 transformers architectures from small
configs (benchmarks/_hf_models.py: encoders, decoder LMs with grouped-query attention,
encoder-decoders, vision and audio models) and captures each with plain
``surgery.capture(model, example_inputs={...})``; exact means equal outputs (every tensor of the
returned ModelOutput) on a fresh input of another batch size and length, where the graph reads
sizes at run time.

    python benchmarks/capture_sweep.py                 # everything (about 10 minutes on 2 cores)
    python benchmarks/capture_sweep.py --family detection --models fcos_resnet50_fpn
    python benchmarks/capture_sweep.py --family hf
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision.models as tvm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, write_result  # noqa: E402

import surgery  # noqa: E402
from surgery.verify import max_abs_diff, run_eval  # noqa: E402

FAMILIES = {
    "classification": tvm,
    "segmentation": tvm.segmentation,
    "video": tvm.video,
    "detection": tvm.detection,
    "optical_flow": tvm.optical_flow,
}
WHOLE = {"classification", "segmentation", "video", "hf"}


def example_inputs(family: str, name: str) -> tuple:
    g = torch.Generator().manual_seed(0)
    if family == "detection":
        return ([torch.rand(3, 192, 240, generator=g)],)
    if family == "optical_flow":
        return (torch.rand(1, 3, 128, 128, generator=g), torch.rand(1, 3, 128, 128, generator=g))
    if family == "video":
        size = 224 if name.startswith(("mvit", "swin3d", "s3d")) else 112
        return (torch.rand(1, 3, 16, size, size, generator=g),)
    size = 299 if name == "inception_v3" else 224
    return (torch.rand(1, 3, size, size, generator=g),)


def build(family: str, name: str) -> torch.nn.Module:
    kwargs = {"weights": None}
    if family == "detection" or (family == "segmentation" and name != "lraspp_mobilenet_v3_large"):
        kwargs["weights_backbone"] = None
    if family == "segmentation" and name == "lraspp_mobilenet_v3_large":
        kwargs["weights_backbone"] = None
    return tvm.get_model(name, **kwargs).eval()


def sweep_hf(name: str) -> dict:
    from _hf_models import HF_MODELS, build_hf, output_tensors
    from _hf_models import example_inputs as hf_inputs
    row = {"family": "hf", "model": f"{name} ({HF_MODELS[name][0]})"}
    try:
        model, x = build_hf(name)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = surgery.capture(model, example_inputs=x)
        row["capture_s"] = time.perf_counter() - t0
        meta = gm.meta["surgery"]
        row["opaque"] = list(meta["opaque"])
        row["guards"] = len(meta.get("guards", ()))
        row["nodes"] = len(gm.graph.nodes)
        fresh = hf_inputs(name, seed=1, batch=3, length=7)
        with torch.no_grad():
            got, want = gm(**fresh), model(**fresh)
        row["same_type"] = type(got) is type(want)
        a, b = output_tensors(got), output_tensors(want)
        row["diff"] = max((max_abs_diff(u, v) for u, v in zip(a, b)), default=float("nan")) \
            if len(a) == len(b) else float("inf")
        row["ok"] = row["diff"] == 0 and row["same_type"] and not row["opaque"]
    except Exception as e:  # a sweep never dies on one model
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    return row


def sweep_one(family: str, name: str) -> dict:
    if family == "hf":
        return sweep_hf(name)
    row = {"family": family, "model": name}
    try:
        torch.manual_seed(0)
        model = build(family, name)
        x = example_inputs(family, name)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = surgery.capture(model, x)
        row["capture_s"] = time.perf_counter() - t0
        meta = gm.meta["surgery"]
        row["opaque"] = list(meta["opaque"])
        row["nodes"] = len(gm.graph.nodes) + sum(len(m.graph.nodes) for n, m in gm.named_modules()
                                                  if n and isinstance(m, torch.fx.GraphModule))
        row["diff"] = max_abs_diff(run_eval(model, x), run_eval(gm, x))
        whole_ok = family not in WHOLE or not row["opaque"]
        row["ok"] = row["diff"] == 0 and whole_ok
    except Exception as e:  # a sweep never dies on one model
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    return row


def _names(family: str) -> list[str]:
    if family == "hf":
        from _hf_models import HF_MODELS
        return list(HF_MODELS)
    return tvm.list_models(module=FAMILIES[family])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", action="append", choices=[*FAMILIES, "hf"], help="families to sweep (default all)")
    ap.add_argument("--models", default="", help="comma-separated model names (default all)")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/capture_sweep.md")
    args = ap.parse_args()
    wanted = set(filter(None, args.models.split(",")))
    rows = []
    for family in args.family or [*FAMILIES, "hf"]:
        for name in _names(family):
            if wanted and name not in wanted:
                continue
            r = sweep_one(family, name)
            rows.append(r)
            status = "exact" if r["ok"] else "FAIL"
            detail = r.get("error") or (f"opaque: {', '.join(r['opaque'])}" if r["opaque"] else "whole")
            print(f"{family:15s} {name:40s} {status:6s} diff={r.get('diff', '-')!s:8s} "
                  f"{r.get('capture_s', 0):6.2f}s  {detail}", flush=True)
    k = sum(r["ok"] for r in rows)
    summary = f"captured {k}/{len(rows)} exact"
    per_family = ", ".join(f"{f}: {sum(r['ok'] for r in rows if r['family'] == f)}/"
                           f"{sum(1 for r in rows if r['family'] == f)}"
                           for f in dict.fromkeys(r["family"] for r in rows))
    print(summary, f"({per_family})")
    if not args.no_write and rows:
        table = markdown_table(
            ["family", "model", "exact", "max abs diff", "capture s", "graph nodes", "size guards",
             "opaque (data-dependent)"],
            [[r["family"], r["model"], "yes" if r["ok"] else "**no**", r.get("diff", "-"),
              f"{r.get('capture_s', 0):.2f}", r.get("nodes", "-"), r.get("guards", "-"),
              r.get("error") or (", ".join(r["opaque"]) if r["opaque"] else "—")] for r in rows])
        only_hf = args.family == ["hf"]
        path = write_result("capture_sweep_hf" if only_hf else "capture_sweep",
                            "Capture sweep: Hugging Face transformers" if only_hf else
                            "Capture sweep: every torchvision model and the Hugging Face set", None,
                            f"**{summary}** ({per_family})\n\n{table}")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
