"""Fuzz the configuration surface: pass fields, recipes, wrong types for number fields.

Runs the hypothesis properties of tests/test_config_errors.py with many more examples and
counts what each example did: built (or loaded) fine or raised which SurgeryError subclass,
then, when built, applied fine (``surgery.compress`` on a tiny conv net) or raised which
SurgeryError subclass. Any other exception is a bug: it is listed and the script exits 1.

    OMP_NUM_THREADS=2 python benchmarks/fuzz_config.py [--examples 500] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))


def run_property(body: Callable[[Any], list[tuple[str, str]]], examples: int, seed_value: int) -> dict[str, Any]:
    """Run `body` under hypothesis for `examples` examples; tally its (stage, outcome) events and
    keep every exception that is not a SurgeryError (with the example's traceback tail)."""
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st
    events: Counter = Counter()
    others: list[str] = []
    count = {"n": 0}

    @seed(seed_value)
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.data())
    def prop(data):
        # an example counts once its body ran to the end; hypothesis aborts some mid-draw (overruns)
        try:
            events.update(body(data))
        except Exception as e:  # body lets only non-SurgeryError exceptions (and failed asserts) out
            last = traceback.extract_tb(e.__traceback__)[-1]
            others.append(f"{type(e).__name__}: {str(e)[:160]} ({Path(last.filename).name}:{last.lineno})")
        count["n"] += 1

    t = time.perf_counter()
    prop()
    return {"examples": count["n"], "events": events, "others": others, "wall": time.perf_counter() - t}


def _by_class(events: Counter, stage: str) -> str:
    errors = {k: v for (s, k), v in events.items() if s == stage and k != "ok"}
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1])) or "none"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=500, help="hypothesis examples per property (default 500)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch
    torch.set_num_threads(min(2, torch.get_num_threads()))
    import test_config_errors as t
    props = [("pass fields (random values, then compress)", "build", t.fuzz_pass_fields),
             ("recipe TOML texts (load with model, then compress)", "load", t.fuzz_recipe),
             ("wrong types for number fields (must be ConfigError)", "build", t.fuzz_wrong_number_types)]
    rows, failures = [], []
    for name, first, body in props:
        r = run_property(body, args.examples, args.seed)
        ev = r["events"]
        rows.append([name, r["examples"], ev[(first, "ok")], _by_class(ev, first), ev[("apply", "ok")],
                     _by_class(ev, "apply"), len(r["others"]), f"{r['wall']:.0f}"])
        failures += [f"{name}: {o}" for o in r["others"]]
        print(name, r["examples"], dict(ev), len(r["others"]), f"{r['wall']:.0f}s", flush=True)
    from _report import markdown_table, write_result
    tab = markdown_table(["property", "examples run", "built/loaded OK", "build/load errors by class",
                          "applied OK", "apply errors by class", "other exceptions", "wall s"], rows)
    notes = ("Each example of the first property builds one pass (or an AGP schedule, applied through "
             "MagnitudePrune) with 1-3 fields set, two times in three to a value of the field's own kind (in range "
             "or just outside it), else to junk (text, NaN/inf, ints up to 2^70, bools, None, lists, dicts, a module "
             "instance, an AGP); the second writes a recipe of 1-2 tables of known passes with random keys (one "
             "time in ten a misspelt one) and TOML values drawn the same way (nested {type = ...} tables included) "
             "and loads it with `model=`; both then compress a tiny conv net "
             "(conv-BN-ReLU-conv-ReLU-pool-linear, input 2x3x8x8) with what was built. The third gives every number "
             "field of every pass a value of a wrong type and requires a ConfigError naming that field. Only "
             "SurgeryError subclasses may come out; any other exception is listed below and fails the run.")
    if failures:
        notes += "\n\nOther exceptions (bugs):\n\n" + "\n".join(f"- {f}" for f in failures[:50])
    path = write_result("fuzz_config", "Configuration fuzzing: every bad input is a SurgeryError",
                        "OMP_NUM_THREADS=2 python " + " ".join(["benchmarks/fuzz_config.py", *sys.argv[1:]]),
                        tab, notes)
    print(path, "FAILED" if failures else "no other exceptions")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
