"""Property check: Shrink is exact on random small DAGs (conv/BN/ReLU/add/cat/flatten/linear)
with random masks (shared per group, soft and hard, and extra masks at random points).

    OMP_NUM_THREADS=2 python benchmarks/shrink_property.py [--examples 200]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import test_shrink_property as test_shrink
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st
    count = {"n": 0}

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.data())
    def prop(data):
        count["n"] += 1
        test_shrink.check_random_dag(data)

    t = time.perf_counter()
    status = "all exact"
    try:
        prop()
    except Exception as e:  # hypothesis prints the shrunk counterexample
        status = f"FAILED: {type(e).__name__}: {str(e)[:200]}"
    wall = time.perf_counter() - t
    from _report import markdown_table, write_result
    tab = markdown_table(["examples run", "result", "wall s"], [[count["n"], status, f"{wall:.0f}"]])
    path = write_result("shrink_property", "Shrink property test: random DAGs and random masks",
                        "OMP_NUM_THREADS=2 python " + " ".join(["benchmarks/shrink_property.py", *sys.argv[1:]]),
                        tab, "Each example: a random DAG of conv (incl. depthwise)/BN/ReLU/add/cat, channels-last "
                        "LayerNorm/RMSNorm (module and decomposed), gated units, single-head attention and "
                        "multi-head attention (grouped-query or not, eager or SDPA) ending in "
                        "flatten or mean + Linear, random BN statistics, random shared masks per channel group "
                        "(hard or soft, negative factors included) and up to two extra hard masks at random "
                        "layer outputs; checked on a fresh input of another batch size.")
    print(status, count["n"], f"{wall:.0f}s", path)


if __name__ == "__main__":
    main()
