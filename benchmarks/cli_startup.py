"""How long the ``surgery`` command takes to answer, against ``python -c "import torch"``.

Each command runs in a fresh interpreter, alternating, after warm-up runs (the page cache holds
torch's libraries for all of them); the table gives medians and the ratio to importing torch.

    python benchmarks/cli_startup.py [--runs 9]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._report import markdown_table, write_result  # noqa: E402


def _small_torchscript(path: Path) -> None:
    import torch
    from torch import nn

    import surgery
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10)).eval()
    x = torch.randn(1, 3, 16, 16)
    net(x)
    surgery.export(net, path, (x,))


def _time(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=False, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as d:
        small, empty = Path(d) / "small.pt", Path(d) / "empty.pt"
        _small_torchscript(small)
        empty.write_bytes(b"")
        commands = {
            'python -c "import torch"': [py, "-c", "import torch"],
            'python -c "pass"': [py, "-c", "pass"],
            "surgery --version": [py, "-m", "surgery", "--version"],
            "surgery inspect empty.pt (an error)": [py, "-m", "surgery", "inspect", str(empty)],
            "surgery inspect small.pt (TorchScript)": [py, "-m", "surgery", "inspect", str(small)],
        }
        times: dict[str, list[float]] = {k: [] for k in commands}
        for i in range(args.warmup + args.runs):
            for name, cmd in commands.items():  # alternating: a slow spell of the machine hits every command
                t = _time(cmd)
                if i >= args.warmup:
                    times[name].append(t)
    base = statistics.median(times['python -c "import torch"'])
    rows = [[name, f"{statistics.median(v):.2f}", f"{min(v):.2f}-{max(v):.2f}", f"{statistics.median(v) / base:.2f}"]
            for name, v in times.items()]
    text = markdown_table(["command", "median s", "range s", "ratio to import torch"], rows)
    notes = (f"{args.runs} runs each after {args.warmup} warm-up runs, commands alternating, each a fresh "
             "interpreter (python -m surgery is what the console script runs). Goal (issue 20): inspect on a small "
             "TorchScript file at most 1.3x importing torch; --version and file errors without importing torch.")
    print(text + "\n\n" + notes)
    if not args.no_write:
        write_result("cli_startup", "Command-line start-up against importing torch", None, text, notes)


if __name__ == "__main__":
    main()
