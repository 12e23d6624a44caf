"""The `surgery` command (first version: `surgery demo` captures ResNet-18 and prints a summary)."""
from __future__ import annotations

import argparse
import sys

import torch


def _demo() -> int:
    import torchvision
    import surgery
    model = torchvision.models.resnet18(weights=None).eval()
    gm = surgery.capture(model, (torch.rand(1, 3, 224, 224),))
    rows = [(n.target, type(gm.get_submodule(n.target)).__name__, tuple(n.meta["shape"]))
            for n in gm.graph.nodes if n.op == "call_module"]
    for name, kind, shape in rows:
        print(f"{name:24s} {kind:18s} {shape}")
    params = sum(p.numel() for p in gm.parameters())
    print(f"captured resnet18: {len(gm.graph.nodes)} nodes, {len(rows)} module calls, {params:,} parameters")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="surgery", description="model surgery for PyTorch")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the end-to-end demo")
    args = ap.parse_args(argv)
    if args.command == "demo":
        return _demo()
    return 2


if __name__ == "__main__":
    sys.exit(main())
