"""Run every benchmark in this folder (what `make bench` runs). Each writes benchmarks/results/NAME.md.

    python benchmarks/run_all.py             # all
    python benchmarks/run_all.py capture_sweep shrink_sweep
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# scripts run more than once, one argument list per run (the rest run once without arguments)
RUNS = {"shrink_sweep": [[], ["--family", "timm"], ["--family", "hf"], ["--family", "video"]],
        "capture_sweep": [[], ["--family", "hf"]],
        "shrink_speed": [[], ["--family", "timm"], ["--family", "hf"], ["--family", "video"]]}


def main() -> int:
    wanted = sys.argv[1:]
    scripts = sorted(p for p in HERE.glob("*.py") if not p.name.startswith("_") and p.name != "run_all.py"
                     and p.name != "digits.py")
    if wanted:
        scripts = [p for p in scripts if p.stem in wanted]
    failed = []
    for script in scripts:
        for args in RUNS.get(script.stem, [[]]):
            name = " ".join([script.name, *args])
            t0 = time.perf_counter()
            print(f"== {name}", flush=True)
            rc = subprocess.call([sys.executable, str(script), *args], cwd=HERE.parent)
            print(f"== {name}: exit {rc} in {time.perf_counter() - t0:.0f} s", flush=True)
            if rc:
                failed.append(name)
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
