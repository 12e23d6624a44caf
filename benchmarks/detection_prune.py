"""Channel groups, ChannelPrune and Shrink on every torchvision detection model.

Detection models keep a data-dependent top-level forward: capture makes it an eager shell and
traces its children (backbone, FPN, heads), which the channel analysis covers graph by graph,
joining graphs where eager code hands one's output to the next unchanged (SSD's backbone to its
head; RetinaNet and FCOS trace whole). For each model in
``torchvision.models.list_models(module=torchvision.models.detection)`` (weights=None,
weights_backbone=None, eval mode, input ``[torch.rand(3, 192, 240)]``):

- groups: all of them, those with channels in the backbone (module path with "backbone") and in
  the heads ("head"), each as found/prunable, those that span two nested graphs (handed on by
  eager code) and the frozen ones;
- params before and after ``ChannelPrune(ratio=0.5)`` then ``Shrink()``;
- exactness on a fresh image: max abs diff between the masked and the shrunk model's outputs
  (boxes, scores, labels, masks, keypoints: every tensor) and, where there are nested graphs,
  the max relative diff between what each returned in the masked run and what its shrunk self
  returns for the same arguments (backbone features, head outputs);
- time: capture, analysis (channel_groups), ChannelPrune (compress of the captured model),
  Shrink (compress of the masked model, its two verification runs included).

    python benchmarks/detection_prune.py                       # all models (several minutes on 2 cores)
    python benchmarks/detection_prune.py --models fasterrcnn_mobilenet_v3_large_320_fpn
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from _report import markdown_table, write_result  # noqa: E402

import surgery  # noqa: E402
from passes import ChannelPrune, Shrink  # noqa: E402
from surgery.verify import max_abs_diff  # noqa: E402

HEADERS = ["model", "capture", "groups", "backbone", "heads", "across graphs", "frozen", "params before",
           "params after", "kept",
           "output diff (boxes)", "boundary diff", "capture s", "analysis s", "prune s", "shrink s"]


def _image(seed: int) -> list[torch.Tensor]:
    return [torch.rand(3, 192, 240, generator=torch.Generator().manual_seed(seed))]


def _where(group) -> set[str]:
    """The qualified module paths of the layers (or nodes) at the group's places (from the captured model)."""
    paths = set()
    for p in group.places():
        name = str(p.node.target) if p.node.op == "call_module" else p.node.name
        paths.add(f"{p.graph}.{name}" if p.graph else name)
    return paths


def _count(groups, part: str) -> str:
    mine = [g for g in groups if any(part in w for w in _where(g))]
    return f"{len(mine)} ({sum(not g.frozen for g in mine)})"


def _across(groups) -> str:
    mine = [g for g in groups if len({p.graph for p in g.places()}) > 1]
    return f"{len(mine)} ({sum(not g.frozen for g in mine)})"


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def run(name: str) -> list:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None).eval()
    x = _image(0)
    t = time.perf_counter()
    gm = surgery.capture(model, (x,))
    t_capture = time.perf_counter() - t
    t = time.perf_counter()
    groups = surgery.channel_groups(gm)
    t_analysis = time.perf_counter() - t
    t = time.perf_counter()
    masked = surgery.compress(gm, [ChannelPrune(ratio=0.5)], example_inputs=(x,))
    t_prune = time.perf_counter() - t
    t = time.perf_counter()
    small = surgery.compress(masked, [Shrink()], example_inputs=(x,))
    t_shrink = time.perf_counter() - t
    y = _image(1)
    with torch.no_grad():
        a, b = masked(y), small(y)
    inner = surgery.nested_errors(masked, small, (y,))  # each shrunk nested graph on what the masked one was given
    boxes = sum(len(d["boxes"]) for d in a)
    try:
        out = f"{max_abs_diff(a, b):.1e} ({boxes})"
    except ValueError as e:  # a different number of boxes
        out = f"differs: {str(e)[:60]}"
    boundary = f"{max(inner.values()):.1e} ({len(inner)} graphs)" if inner else "n/a (one graph)"
    how = "shell" if gm.meta["surgery"].get("shell") else "whole"
    return [name, how, f"{len(groups)} ({sum(not g.frozen for g in groups)})", _count(groups, "backbone"),
            _count(groups, "head"), _across(groups), sum(bool(g.frozen) for g in groups),
            f"{_params(model):,}", f"{_params(small):,}", f"{_params(small) / _params(model):.1%}", out, boundary,
            f"{t_capture:.1f}", f"{t_analysis:.2f}", f"{t_prune:.1f}", f"{t_shrink:.1f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", help="model names (default: every detection model)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    names = args.models or torchvision.models.list_models(module=torchvision.models.detection)
    rows = []
    start = time.perf_counter()
    for name in names:
        try:
            rows.append(run(name))
        except Exception as e:  # a sweep never dies on one model: it reports it and goes on
            rows.append([name, f"FAILED: {type(e).__name__}: {str(e)[:150]}"] + [""] * (len(HEADERS) - 2))
        print(" | ".join(map(str, rows[-1])), flush=True)
        gc.collect()
    wall = time.perf_counter() - start
    notes = (f"{len(rows)} models, {wall:.0f} s in all. Groups are counted as found (prunable, i.e. not frozen); "
             "backbone/heads by the module paths of a group's places (a group handed from backbone to "
             "head counts in both, and in 'across graphs'). ChannelPrune(ratio=0.5) masks half "
             "of every prunable group, Shrink removes them. 'output diff' compares every tensor the masked and "
             "the shrunk model return for a fresh image (in parentheses: the boxes compared; untrained detectors "
             "let few or none pass their score threshold). 'boundary diff' compares, relative to each tensor's "
             "largest magnitude, what every nested graph returned in that masked run with what its shrunk self "
             "returns for the same arguments (features, head outputs): graph by graph, so that eager code between "
             "the graphs (which proposals pass on) cannot blur the comparison. Shrink checks both on the example "
             "image itself.")
    path = write_result("detection_prune", "Detection models: channel groups across nested graphs, "
                        "ChannelPrune(0.5) + Shrink", "python " + " ".join(["benchmarks/detection_prune.py",
                                                                            *sys.argv[1:]]),
                        markdown_table(HEADERS, rows), notes)
    print(path)


if __name__ == "__main__":
    main()
