"""The shrink sweep's table: one row per model, the summary line (exact, exported, smaller;
params kept, ours and Torch-Pruning's; wall time) and the notes under it. See
benchmarks/shrink_sweep.py."""
from __future__ import annotations

import statistics

__all__ = ["table", "summary", "notes"]


# unit -> (scale, decimals)
_FORMATS = {"K": (1e-3, 1), "M": (1e-6, 1), "G": (1e-9, 2), "ms": (1e3, 0), "ms2": (1e3, 2), "s": (1, 1), "s2": (1, 2)}


def _fmt(v, kind):
    if v is None:
        return "-"
    if kind not in _FORMATS:
        return str(v)
    scale, digits = _FORMATS[kind]
    return f"{v * scale:.{digits}f}"


# units of the table's columns (params, MACs, seconds, latency): the Hugging Face models here are
# tiny (tens of thousands of parameters, sub-millisecond forwards) and get finer ones
_UNITS = {"torchvision": ("M", "G", "s", "ms"), "timm": ("M", "G", "s", "ms"), "hf": ("K", "K", "s2", "ms2"),
          "video": ("M", "G", "s", "ms")}
_UNIT_NAMES = {"K": "K", "M": "M", "G": "G", "s": "s", "s2": "s", "ms": "ms", "ms2": "ms"}


def ratio_str(rows) -> str:
    return "1.6.1"


def _tp_cell(r: dict) -> str:
    ok = r.get("tp_ok")
    return "yes" if ok else ("-" if ok is None else f"NO ({(r.get('tp_error') or '')[:40]})")


def table(rows: list[dict], family: str = "torchvision") -> tuple[str, str]:
    from _report import markdown_table
    tp = any("tp_time" in r or "tp_ok" in r for r in rows)
    pu, mu, su, lu = _UNITS[family]
    pn, mn = _UNIT_NAMES[pu], _UNIT_NAMES[mu]
    first = {"torchvision": ["model"], "timm": ["family", "timm model", "input"], "hf": ["model", "kind"],
             "video": ["model", "input"]}[family]
    heads = first + ["exact", "rel. error", f"params {pn}", f"MACs {mn}", "surgery s (verify s)", "latency ms (b1)",
                     "export"]
    budget = any("budget_macs" in r or "budget_error" in r for r in rows)
    if budget:
        heads.append("MACs kept at target_macs=0.5")
    if tp:
        heads += ["TP s", f"TP params {pn}", f"TP MACs {mn}", "TP latency ms", "TP ok"]

    def tp_cells(r: dict) -> list[str]:
        return [_fmt(r.get("tp_time"), su), _fmt(r.get("tp_params"), pu), _fmt(r.get("tp_macs"), mu),
                _fmt(r.get("tp_latency"), lu), _tp_cell(r)]
    out = []
    for r in rows:
        if family == "timm":
            size = r.get("input_size")
            lead = [r["model"], r.get("arch", "-"), f"{size[1]}x{size[2]}" if size else "-"]
        elif family == "hf":
            lead = [r["model"], r.get("kind", "-")]
        elif family == "video":
            size = r.get("input_size")
            lead = [r["model"], "x".join(map(str, size[1:])) if size else "-"]
        else:
            lead = [r["model"]]
        if "skipped" in r:
            out.append(lead + ["skipped", r["skipped"][:120]] + ["-"] * (len(heads) - len(lead) - 2))
            continue
        if "error" in r:
            line = lead + ["FAIL", r["error"][:80]] + ["-"] * (len(heads) - len(lead) - 2)
            if tp and family != "torchvision":  # Torch-Pruning ran beside our failure
                line[-5:] = tp_cells(r)
            out.append(line)
            continue
        line = lead + ["yes" if r["exact"] else "NO", f"{r['rel_error']:.1e}",
                       f"{_fmt(r['params_before'], pu)} -> {_fmt(r['params_after'], pu)}",
                       f"{_fmt(r['macs_before'], mu)} -> {_fmt(r['macs_after'], mu)}",
                       f"{_fmt(r['surgery_time'], su)} ({_fmt(r.get('verify_time'), su)})",
                       f"{_fmt(r['latency_before'], lu)} -> {_fmt(r['latency_after'], lu)}",
                       _export_cell(r)]
        if budget:
            line.append(_budget_cell(r))
        if tp:
            line += tp_cells(r)
        out.append(line)
    return markdown_table(heads, out), summary(rows, family)


def _budget_cell(r: dict) -> str:
    if "budget_macs" in r:
        return f"{r['budget_macs']:.3f}" + (" (as far as it goes)" if r.get("budget_floor") else "")
    return f"NO ({r['budget_error'][:40]})" if "budget_error" in r else "-"


def _export_cell(r: dict) -> str:
    """The formats written and verified ("pt, pt2, onnx"), a failed one marked NO; "yes" for a row
    from before the sweep wrote .pt2 and ONNX (TorchScript only)."""
    if "exports" not in r:
        return "yes (pt)" if r.get("export") else "NO"
    return ", ".join(f if ok else f"{f} NO ({(r.get('export_errors') or {}).get(f, '')[:40]})"
                     for f, ok in r["exports"].items())


def _export_counts(good: list[dict]) -> str:
    fmts = [f for f in ("pt", "pt2", "onnx") if any(f in r.get("exports", {}) for r in good)]
    if fmts == ["pt"] or not fmts:
        return ""
    return " (" + ", ".join(f"{f} {sum(1 for r in good if r.get('exports', {}).get(f))}" for f in fmts) + ")"


def summary(rows: list[dict], family: str = "torchvision") -> str:
    """The sentence under the table. torchvision's wording is the one its results have always
    had; timm and hf add skipped families and, on the models where Torch-Pruning works, the
    median share of parameters each tool keeps."""
    skipped = [r for r in rows if "skipped" in r]
    ran = [r for r in rows if "skipped" not in r]
    good = [r for r in ran if "error" not in r]
    n_exact = sum(1 for r in good if r["exact"])
    n_exp = sum(1 for r in good if r.get("export"))
    n_small = sum(1 for r in good if r["params_after"] < r["params_before"])
    unit = "families" if family == "timm" else "models"
    text = (f"{len(ran) if family != 'torchvision' else len(rows)} {unit}: {n_exact} exact, {n_exp} exported"
            f"{_export_counts(good)}, {n_small} smaller, {len(ran) - len(good)} failed")
    if family != "torchvision" and skipped:
        text += f", {len(skipped)} more skipped (no model of the family builds on CPU)"
    text += "."
    if good:
        text += (f" Median surgery time {statistics.median(r['surgery_time'] for r in good):.1f} s; "
                 f"median params kept {statistics.median(r['params_after'] / r['params_before'] for r in good):.0%}, "
                 f"MACs kept {statistics.median(r['macs_after'] / r['macs_before'] for r in good):.0%}.")
    budgeted = [r for r in good if "budget_macs" in r or "budget_error" in r]
    if budgeted:
        met = sum(1 for r in budgeted if abs(r.get("budget_macs", 9) - 0.5) <= 0.02)
        floor = sum(1 for r in budgeted if r.get("budget_floor"))
        text += (f" ChannelPrune(target_macs=0.5) kept 0.5 ±0.02 of the MACs on {met}/{len(budgeted)}"
                 + (f" ({floor} cannot get that low: their prunable groups, each down to one channel, leave more)"
                    if floor else "") + ".")
    both = [r for r in good if r.get("tp_ok")]
    if both:
        faster = sum(1 for r in both if r["surgery_time"] < r["tp_time"])
        faster_nv = sum(1 for r in both if "verify_time" in r and r["surgery_time"] - r["verify_time"] < r["tp_time"])
        text += f" Torch-Pruning {ratio_str(rows)} worked on {len(both)}/{len(good)}"
        if family != "torchvision":
            ours = statistics.median(r["params_after"] / r["params_before"] for r in both)
            theirs = statistics.median(r["tp_params"] / r["params_before"] for r in both)
            text += f"; on those, median params kept {ours:.0%} (surgery) vs {theirs:.0%} (Torch-Pruning); surgery"
        else:
            text += "; surgery"
        text += (f" took less wall time on {faster}/{len(both)} of those ({faster_nv}/{len(both)} not counting its "
                 "own verification runs, which Torch-Pruning does not do).")
    tp_only = [r for r in ran if "error" in r and r.get("tp_ok")]
    if family != "torchvision" and tp_only:
        text += f" Torch-Pruning also worked on {len(tp_only)} of the {len(ran) - len(good)} where surgery failed."
    return text


def notes(family: str, size: int) -> str:
    """What the table's inputs and weights were, under the summary."""
    exact = "exact = max rel. error < 1e-4 between the masked and the shrunk model on a fresh input"
    if family == "timm":
        return (f"One model per timm architecture family (benchmarks/_timm_models.py: per family the first model by "
                "its size rule that builds on CPU, with a 1000-class head where its default has none); input "
                "1xCxHxW of the model's pretrained_cfg input_size, sides "
                f"over {size} brought down to {size} where the model runs on that (column input); weights random "
                "(pretrained=False, zero-initialised tensors, near-zero norm gains and layer scales re-drawn, BN "
                f"statistics random); {exact}.")
    if family == "hf":
        return ("Hugging Face transformers models from small configs (benchmarks/_hf_models.py), keyword inputs "
                "(batch 2, 9 tokens; 32x32 pixels, 64x64 for detection; 16x32 mel features); weights random "
                f"(zero-initialised tensors and near-zero norm gains re-drawn); {exact} (every output tensor, fresh "
                "inputs of seed 1). Export gets the fresh inputs' tensors (TorchScript takes no bool: use_cache=False "
                "stays as captured).")
    if family == "video":
        return ("torchvision's video classifiers; input 1x3xTxHxW (column input: 16x224x224 for MViT, S3D and Swin3D, "
                "which are built for it, else 8x112x112); weights random (weights=None, zero-initialised tensors "
                f"re-drawn, BN statistics random); {exact}. Torch-Pruning gets its torchvision settings.")
    return (f"Input 1x3x{size}x{size}; weights random (weights=None, zero-initialised tensors re-drawn, BN "
            f"statistics random); {exact}.")
