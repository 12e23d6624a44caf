"""Pruning a 1.1B-parameter Llama-architecture model on one machine, surgery against Torch-Pruning
in the same run.

The model is built from its config (hidden 2048, 22 layers, 32 heads, 4 kv heads, intermediate
5632, vocab 32000: the TinyLlama shape, float32, random weights, nothing downloaded), with 8
example tokens. Each tool runs in a fresh process (peak RSS is per process):

- surgery: ``compress(model, [ChannelPrune(0.5), Shrink(into="modules")], inputs)``: capture,
  heads, MLP and the residual stream masked, Shrink verified against the masked model, and the
  model handed back as a LlamaForCausalLM (its RMSNorms rescaled, its config updated). Then 20
  tokens of greedy ``generate()`` with the KV cache, checked against a full forward per step.
- Torch-Pruning 1.6.1: its LLM example's recipe (MetaPruner, GroupMagnitudeImportance(p=2), the
  q/k/v head counts with the kv heads for k and v, prune_num_heads, head_pruning_ratio = ratio,
  lm_head ignored), then the attention modules' head counts set by hand as the example does.

Columns: wall time of the pruning call, peak RSS over the weights' bytes (the model itself
included: 1.00 would be the weights alone), params kept, whether the pruned model runs, and
surgery's own verification error.

    python benchmarks/llm_scale.py                   # both tools (~6 min on 2 cores)
    python benchmarks/llm_scale.py --tools surgery
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import markdown_table, write_result  # noqa: E402

CONFIG = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
              intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)
RATIO = 0.5
TP_LIMIT_S = 900  # Torch-Pruning loops for good on transformers' Llama (see shrink_sweep_hf.md): a limit


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _build():
    import torch
    import transformers
    torch.manual_seed(0)
    with torch.no_grad():
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "use_cache": False}


def run_surgery() -> dict:
    import torch

    import surgery
    from passes import ChannelPrune, Shrink
    model, x = _build()
    n0 = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    base = _rss()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = surgery.compress(model, [ChannelPrune(ratio=RATIO), Shrink(into="modules")], x)
    seconds = time.perf_counter() - t0
    peak = _peak()
    with torch.no_grad():
        prompt = x["input_ids"][:, :5]
        out = small.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=True,
                             pad_token_id=0)
        ids = prompt
        for _ in range(20):
            ids = torch.cat([ids, small(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    c = small.config
    kept = sum(p.numel() for p in small.parameters()) / n0
    return dict(tool="surgery", seconds=seconds, peak=peak / weights, extra=(peak - base) / weights, kept=kept,
                runs=type(small).__name__,
                error=small.report.max_rel_error, generate=bool(torch.equal(out, ids)),
                config=f"hidden {c.hidden_size}, heads {c.num_attention_heads}/{c.num_key_value_heads}, "
                       f"intermediate {c.intermediate_size}")


def run_tp(limit: float = TP_LIMIT_S) -> dict:
    import torch
    import torch_pruning as tp
    model, x = _build()
    n0 = sum(p.numel() for p in model.parameters())
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    base = _rss()
    num_heads = {}
    for layer in model.model.layers:
        a = layer.self_attn
        num_heads[a.q_proj] = model.config.num_attention_heads
        num_heads[a.k_proj] = num_heads[a.v_proj] = model.config.num_key_value_heads
    from _torch_pruning import time_limit
    t0 = time.perf_counter()
    try:
        with time_limit(limit):
            pruner = tp.pruner.MetaPruner(model, example_inputs=x["input_ids"],
                                          importance=tp.importance.GroupMagnitudeImportance(p=2),
                                          pruning_ratio=RATIO, ignored_layers=[model.lm_head], num_heads=num_heads,
                                          prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=RATIO,
                                          global_pruning=False, output_transform=lambda out: out.logits)
            pruner.step()
    except TimeoutError as e:
        return dict(tool="Torch-Pruning", seconds=time.perf_counter() - t0, peak=_peak() / weights,
                    extra=(_peak() - base) / weights, kept=float("nan"), runs=f"did not finish ({e})", error=None,
                    generate=None, config="")
    seconds = time.perf_counter() - t0
    peak = _peak()
    for layer in model.model.layers:  # what its LLM example does by hand
        a = layer.self_attn
        a.num_heads = a.q_proj.out_features // a.head_dim
        a.num_key_value_heads = a.k_proj.out_features // a.head_dim
        a.num_key_value_groups = a.num_heads // a.num_key_value_heads
    model.config.num_attention_heads = model.model.layers[0].self_attn.num_heads
    model.config.num_key_value_heads = model.model.layers[0].self_attn.num_key_value_heads
    try:
        with torch.no_grad():
            model(**x)
        runs = "yes"
    except Exception as e:  # noqa: BLE001 - recorded in the table
        runs = f"no ({type(e).__name__})"
    return dict(tool="Torch-Pruning", seconds=seconds, peak=peak / weights, extra=(peak - base) / weights,
                kept=sum(p.numel() for p in model.parameters()) / n0, runs=runs, error=None, generate=None,
                config=f"hidden {model.model.embed_tokens.embedding_dim}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tools", default="surgery,tp")
    ap.add_argument("--one", choices=["surgery", "tp"], help=argparse.SUPPRESS)
    ap.add_argument("--tp-limit", type=float, default=TP_LIMIT_S, help="seconds for Torch-Pruning's run")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_tp(args.tp_limit) if args.one == "tp" else run_surgery()))
        return
    rows = []
    for tool in args.tools.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", tool, "--tp-limit", str(args.tp_limit)],
                              capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:])
            rows.append(dict(tool=tool, seconds=float("nan"), peak=float("nan"), extra=float("nan"),
                             kept=float("nan"),
                             runs=f"failed (exit {proc.returncode})", error=None, generate=None, config=""))
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    table = markdown_table(
        ["tool", "prune s", "peak RSS / weights", "added by pruning / weights", "params kept", "pruned model",
         "verified max rel. error", "generate() 20 tokens = full forwards", "widths"],
        [[r["tool"], f"{r['seconds']:.1f}", f"{r['peak']:.2f}", f"{r['extra']:.2f}", f"{r['kept']:.3f}",
          r["runs"],
          "-" if r["error"] is None else f"{r['error']:.1e}", "-" if r["generate"] is None else str(r["generate"]),
          r["config"]] for r in rows])
    notes = ("1.1B-parameter LlamaForCausalLM from its config (TinyLlama's shape), float32, 8 example tokens, "
             f"ratio {RATIO}. prune s: the pruning call alone (surgery: capture, ChannelPrune, Shrink with both "
             "verification runs and the model handed back in its own class; Torch-Pruning: MetaPruner's "
             "construction and step). Peak RSS is the whole process's (Python, torch and transformers loaded, model "
             "built, pruned), over the weights' bytes; 'added by pruning' is that peak less the RSS just before "
             "the pruning call (the pruned model's own weights included).")
    print(f"wrote {write_result('llm_scale', 'Pruning a 1.1B Llama on one machine', None, table, notes)}")


if __name__ == "__main__":
    main()
