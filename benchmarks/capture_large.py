"""Capture time and peak memory on a 1.1B-parameter Llama-architecture model built from its
config (hidden 2048, 22 layers, 32 heads, 4 kv heads, intermediate 5632, vocab 32000: the
TinyLlama shape), random weights, nothing downloaded.

Each measurement runs in a fresh process (peak RSS is per process): build the model, record the
RSS, capture it with keyword inputs (8 tokens), record the capture time and the process's peak
RSS relative to the weights' bytes. ``capture`` traces a copy of the model (the caller's is never
touched) whose parameters are copy-on-write: they share the caller's memory until either side
writes into them, so the floor is the weights once, not twice.

    python benchmarks/capture_large.py
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import markdown_table, write_result  # noqa: E402

CONFIG = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
              intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure() -> dict:
    import torch
    import transformers

    import surgery
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.no_grad():
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 8))
    base = _peak_rss()
    t0 = time.perf_counter()
    gm = surgery.capture(model, example_inputs={"input_ids": ids, "use_cache": False})
    capture_s = time.perf_counter() - t0
    peak = _peak_rss()
    with torch.no_grad():
        diff = (gm(input_ids=ids).logits - model(input_ids=ids, use_cache=False).logits).abs().max().item()
    return dict(params=params, weights=weights, build_s=build_s, capture_s=capture_s,
                extra_peak=peak - base, ratio=peak / weights, opaque=len(gm.meta["surgery"]["opaque"]),
                diff=diff, nodes=len(gm.graph.nodes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure()))
        return
    out = subprocess.run([sys.executable, __file__, "--one"], capture_output=True, text=True)
    if out.returncode:
        print(out.stderr[-2000:])
        raise SystemExit(f"exit {out.returncode}")
    rows = [json.loads(out.stdout.strip().splitlines()[-1])]
    print(rows[0], flush=True)
    table = markdown_table(
        ["model", "params", "weights GiB", "build s", "capture s", "peak RSS / weights", "graph nodes", "opaque",
         "max abs diff"],
        [["LlamaForCausalLM", f"{r['params'] / 1e9:.2f}B",
          f"{r['weights'] / 2**30:.2f}", f"{r['build_s']:.1f}", f"{r['capture_s']:.1f}", f"{r['ratio']:.2f}",
          r["nodes"], r["opaque"], f"{r['diff']:.1e}"] for r in rows])
    notes = ("peak RSS / weights: the process's peak resident memory (model built, then captured) over the "
             "weights' bytes; 1.00 would be the weights alone. The captured copy's parameters are copy-on-write "
             "(surgery.copying.lazy_copy); max abs diff: captured against eager logits.")
    path = write_result("capture_large", "Capture of a 1.1B-parameter Llama built from its config", None, table,
                        notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
