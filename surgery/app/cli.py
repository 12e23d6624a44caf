"""The ``surgery`` command: ``inspect`` any model file, ``compress`` a model from a recipe, ``demo``.

    surgery inspect model.pt [--input-shape 1,3,224,224] [--json] [--groups] [--trust]
    surgery compress torchvision.models:resnet18 --recipe examples/resnet18_prune_half.toml \\
        --input-shape 1,3,224,224 -o small.pt [--weights sd.pt] [--trust]
    surgery demo

Errors the user can fix (a missing file, an untrusted pickle, a bad recipe) print one line on
stderr and exit with status 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect as pyinspect
import os
import sys
import warnings
from typing import Any, Sequence

from ..errors import SurgeryError
from ..paths import readable_file
from ..progress import quiet

__all__ = ["main", "build_parser", "model_from_spec"]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage dump is noise for a one-line error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


EXAMPLES = """examples:
  surgery inspect model.pt                          layers, parameters, sparsity, masks
  surgery inspect model.pt --input-shape 1,3,224,224 --groups
                                                    ... with MACs, and channel groups (why any is frozen)
  surgery inspect small.onnx                        a deployed .onnx or .pt2 file, read without unpickling
  surgery compress torchvision.models:resnet18 --recipe examples/resnet18_prune_half.toml \\
      --input-shape 1,3,224,224 -o small.pt2        prune, shrink, export and verify
  surgery demo                                      digits end to end: train, mask, shrink, export

Python API, examples and recipes: the README, and help(surgery.compress) in Python."""


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("surgery")
    except Exception:  # running from a source tree that is not installed
        from .. import __version__
        return __version__


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="surgery", description="Model surgery for PyTorch: inspect, compress, demo.",
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"surgery {_version()}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", metavar="{inspect,compress,demo}", parser_class=_Parser)

    i = sub.add_parser("inspect", help="summarise a model file: layers, parameters, sparsity, masks, MACs",
                       description="Summarise a TorchScript archive, a state_dict, a surgery compact archive, "
                                   "a pickled module (with --trust), or a deployed .pt2 or .onnx file (read "
                                   "without unpickling: parameters, operators, inputs and outputs).")
    i.add_argument("file", help="model file")
    i.add_argument("--input-shape", metavar="SHAPE", help="e.g. 1,3,224,224 (';' between several inputs): count MACs")
    i.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    i.add_argument("--groups", action="store_true", help="show channel groups and why any is frozen")
    i.add_argument("--trust", action="store_true", help="allow full unpickling (runs code from the file)")
    i.add_argument("--plot", metavar="IMAGE", help="draw each layer's width by channel group, frozen groups "
                                                   "marked with their reason (needs --input-shape)")

    c = sub.add_parser("compress", help="apply a TOML recipe of passes, shrink, export",
                       description="Capture MODEL, apply the recipe's passes, shrink when the recipe lists "
                                   "Shrink, export to -o (TorchScript, .pt2 or ONNX, by its suffix) and compare "
                                   "the file with the masked model.")
    c.add_argument("model", help="factory spec such as torchvision.models:resnet18 or "
                                 "'pkg.mod:fn(num_classes=10)', or a pickled module file (with --trust)")
    c.add_argument("--recipe", required=True, help="TOML recipe ([[passes]] tables)")
    c.add_argument("--input-shape", required=True, metavar="SHAPE", help="example input shape, e.g. 1,3,224,224")
    c.add_argument("-o", "--output", required=True, help="file to write: .pt (TorchScript), .pt2 (torch.export) "
                                                          "or .onnx (ONNX, needs the export extra)")
    c.add_argument("--weights", help="state_dict file to load into the model before compressing")
    c.add_argument("--trust", action="store_true", help="allow full unpickling of MODEL/--weights files")
    c.add_argument("--freeze", action="store_true", help="write a frozen, inference-only TorchScript file "
                   "(what to deploy; see surgery.export)")
    c.add_argument("--json", action="store_true", help="print one JSON document (before, after, check)")
    c.add_argument("--quiet", action="store_true", help="print only the before/after comparison (no progress)")
    c.add_argument("--plot", metavar="IMAGE", help="draw each layer's width before and after Shrink, by channel "
                                                   "group (.png, .svg, .pdf)")

    d = sub.add_parser("demo", help="train, mask, shrink and export a digits CNN end to end",
                       description="On scikit-learn's digits: train a small CNN, add DAM masks, train with "
                                   "the penalty, shrink, export TorchScript, compare before and after.")
    d.add_argument("-o", "--output", default="digits_small.pt", help="TorchScript file to write")
    d.add_argument("--epochs", type=int, default=None, help="epochs per phase (default: the demo's own)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: fastest for these tiny layers)")
    return p


# ---------------------------------------------------------------- inspect

def cmd_inspect(args: argparse.Namespace) -> int:
    readable_file(args.file)  # before torch is imported: a wrong path is reported at once
    suffix = os.path.splitext(args.file)[1].lower()
    if suffix in (".pt2", ".onnx"):  # deployed formats: read from their JSON / protobuf, nothing unpickled
        import json

        from ..io.deployed import read_onnx, read_pt2
        d = (read_pt2 if suffix == ".pt2" else read_onnx)(args.file)
        print(json.dumps(d.as_dict(), indent=2) if args.json else d.table())
        return 0
    from ..io.files import load_model_file
    from ..io.inspect import summary
    if args.plot and not args.input_shape:
        raise SurgeryError("--plot draws the channel groups, which need --input-shape to follow tensor shapes")
    loaded = load_model_file(args.file, trust=args.trust)
    s = summary(loaded.model, args.input_shape, groups=args.groups or bool(args.plot), source=args.file,
                kind=loaded.kind)
    if args.plot:
        if not s.groups:
            why = next((n for n in s.notes if "channel groups" in n), "no channel groups")
            raise SurgeryError(f"--plot: {args.file}: {why}")
        from ..io.plot import plot_groups
        plot_groups(s.groups, args.plot, f"{args.file}: channel groups")
    if not args.groups:
        s.groups = None  # drawn, not listed
    if loaded.note:
        s.notes.insert(0, loaded.note)
    print(s.to_json() if args.json else s.table())
    return 0


# ---------------------------------------------------------------- compress

def _parse_call(spec: str) -> tuple[str, dict[str, Any]]:
    """'fn(a=1, b="x")' -> ('fn', {'a': 1, 'b': 'x'}) with literal values only."""
    if "(" not in spec:
        return spec, {}
    name, _, rest = spec.partition("(")
    try:
        call = ast.parse(f"f({rest}", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise ValueError("only keyword arguments are allowed")
        return name.strip(), {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as e:
        raise SurgeryError(f"bad model spec {spec!r}: {e}; write module:factory(key=literal, ...)") from None


def model_from_spec(spec: str, trust: bool = False) -> Any:
    """An nn.Module from ``module:factory`` (called with weights=None where it takes that
    argument, as no weights are downloaded) or from a pickled module file (``trust=True``)."""
    from torch import nn
    if os.path.exists(spec) or ":" not in spec:
        from ..io.files import load_model_file
        loaded = load_model_file(spec, trust=trust)
        if loaded.kind in ("module", "graphmodule") and isinstance(loaded.model, nn.Module):
            return loaded.model
        hint = {"torchscript": "TorchScript cannot be traced by torch.fx; give the Python model (module:factory)",
                "state_dict": "a state_dict holds no code; give module:factory and pass this file as --weights"}
        raise SurgeryError(f"{spec}: a {loaded.kind} file is not a model to compress: "
                           f"{hint.get(loaded.kind, 'give module:factory')}")
    mod_name, _, rest = spec.partition(":")
    attr, kwargs = _parse_call(rest)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise SurgeryError(f"model spec {spec!r}: cannot import {mod_name!r} ({e})") from None
    factory = getattr(mod, attr, None)
    if factory is None or not callable(factory):
        near = [n for n in dir(mod) if attr.lower() in n.lower()][:5]
        raise SurgeryError(f"model spec {spec!r}: {mod_name} has no callable {attr!r}"
                           + (f"; similar: {', '.join(near)}" if near else ""))
    try:
        params = pyinspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    for key in ("weights", "weights_backbone"):
        if key in params and key not in kwargs:
            kwargs[key] = None
    try:
        model = factory(**kwargs)
    except Exception as e:
        raise SurgeryError(f"model spec {spec!r}: {attr}({kwargs}) failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"model spec {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def load_weights(model: Any, path: str, trust: bool = False) -> None:
    """Load a state_dict file into `model` (strict: every key must match)."""
    from ..io.files import load_model_file
    loaded = load_model_file(path, trust=trust)
    sd = loaded.model
    if not isinstance(sd, dict):
        sd = sd.state_dict()
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise SurgeryError(f"{path}: does not fit the model: {' '.join(lines[1:3])[:300]}") from None


def _split_at_shrink(passes: Sequence[Any]) -> tuple[list, list]:
    """Passes before the first Shrink make the masked model; Shrink and the rest shrink it."""
    for k, p in enumerate(passes):
        if type(p).__name__ == "Shrink":
            return list(passes[:k]), list(passes[k:])
    return list(passes), []


class _Stages:
    """One line per stage on stderr ("surgery: shrink (self-check) ... 0.4 s"), when it is a
    terminal: a compress of a large model is minutes of work."""

    def __init__(self, on: bool):
        self.on, self.t = on, None

    def __call__(self, what: str | None) -> None:
        import time
        if not self.on:
            return
        if self.t is not None:
            print(f" {time.perf_counter() - self.t:.1f} s", file=sys.stderr, flush=True)
        self.t = time.perf_counter() if what else None
        if what:
            print(f"surgery: {what} ...", end="", file=sys.stderr, flush=True)


def compress_command(model: Any, recipe: str, input_shape: str, output: str, label: str = "", *,
                     freeze: bool = False, plot: str | None = None, stages: _Stages | None = None) -> dict[str, Any]:
    """Run a recipe on `model` and export it; return the before/after summaries and the check.
    `plot`: an image of the widths before and after Shrink (see :mod:`surgery.io.plot`)."""
    import torch

    import surgery

    from ..calling import call
    from ..io.deploy import format_of, load_deployed
    from ..io.files import load_model_file
    from ..io.inspect import parse_shapes, summary
    from ..verify import max_abs_diff, max_rel_diff, run_eval
    from .recipe import load_recipe
    passes = load_recipe(recipe, model=model)  # a selection that matches nothing fails before any work
    for i, p in enumerate(passes, 1):
        why = getattr(p, "trains", None)
        if why:  # exporting it now would write the model as it was before training, masks and all
            raise SurgeryError(f"{recipe}: [[passes]] #{i} ({type(p).__name__}) {why}, which the command line does "
                               "not run: in Python, surgery.compress(model, surgery.app.recipe.load_recipe(recipe), "
                               "x), train, then Shrink and export (see the README's examples)")
    stages = stages or _Stages(False)
    gen = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(s, generator=gen) for s in parse_shapes(input_shape))
    pre, post = _split_at_shrink(passes)
    if plot and not post:
        raise SurgeryError(f"--plot draws what Shrink removed, and {recipe} has no Shrink pass")
    kind = format_of(output)
    if freeze and kind != "torchscript":
        raise SystemExit(f"surgery: error: --freeze writes TorchScript; {output} is a {kind} file")
    model.eval()
    stages("count parameters and MACs")
    before = summary(model, inputs=inputs, source=label or type(model).__name__, kind="before")
    stages(f"capture and {', '.join(type(p).__name__ for p in pre) or 'no passes'}")
    masked = surgery.compress(model, passes=pre, example_inputs=inputs)
    if post:
        stages(f"{', '.join(type(p).__name__ for p in post)} (checked against the masked model)")
    small = surgery.compress(masked, passes=post, example_inputs=inputs) if post else masked
    if plot:
        from ..io.plot import plot_report
        plot_report(surgery.shrink_report(small), plot, f"{label}: {os.path.basename(recipe)}")
    stages(f"export {output} and verify it")
    surgery.export(small, output, inputs, freeze=freeze)
    stages("compare with the masked model")
    ref = run_eval(masked, inputs)
    if kind == "torchscript":
        exported = load_model_file(output)
        after = summary(exported.model, inputs=inputs, source=output, kind=f"after, {exported.kind}")
        got = run_eval(exported.model, inputs)
    else:  # the layer table of the model written; the file itself, run as deployment runs it, for the check
        after = summary(small, inputs=inputs, source=output, kind=f"after, written as {kind}")
        with torch.no_grad():
            got = call(load_deployed(output, kind), inputs)
        if kind == "onnx":  # a flat list of tensors
            ref = [t for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    check = {"max_abs_diff": max_abs_diff(ref, got), "max_rel_diff": max_rel_diff(ref, got),
             "passes": [repr(p) for p in passes], "output": output, "bytes": os.path.getsize(output)}
    stages(None)
    return {"before": before, "after": after, "check": check}


def _ratio(a: float | None, b: float | None) -> str:
    return f"{b / a:.1%} of before" if a and b is not None else ""


def comparison(before: Any, after: Any, check: dict[str, Any]) -> str:
    from ..io.inspect import human
    tb, ta = before.totals, after.totals
    rows = [("parameters", f"{tb['params']:,}", f"{ta['params']:,}", _ratio(tb["params"], ta["params"])),
            ("MACs", human(tb["macs"]), human(ta["macs"]), _ratio(tb["macs"], ta["macs"]))]
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{'':<{w[0]}}  {'before':>{w[1]}}  {'after':>{w[2]}}"]
    lines += [f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]}" for r in rows]
    lines.append(f"exported {check['output']} ({check['bytes']:,} bytes); against the masked model: "
                 f"max abs diff {check['max_abs_diff']:.3g}, max rel diff {check['max_rel_diff']:.3g}")
    return "\n".join(lines)


def cmd_compress(args: argparse.Namespace) -> int:
    import json
    for path in (args.recipe, args.weights):
        if path:
            readable_file(path)
    stages = _Stages(sys.stderr.isatty() and not (args.quiet or args.json))
    stages(f"build {args.model}")
    model = model_from_spec(args.model, trust=args.trust)
    if args.weights:
        load_weights(model, args.weights, trust=args.trust)
    with quiet():  # the command's own stage lines say it all
        out = compress_command(model, args.recipe, args.input_shape, args.output, label=args.model,
                               freeze=args.freeze, plot=args.plot, stages=stages)
    ok = out["check"]["max_rel_diff"] <= 1e-4
    if args.json:
        print(json.dumps({"before": out["before"].as_dict(), "after": out["after"].as_dict(),
                          "check": {**out["check"], "ok": ok}}, indent=2))
    else:
        if not args.quiet:
            print(out["before"].table(), "", out["after"].table(), "", sep="\n")
        print(comparison(out["before"], out["after"], out["check"]))
    if not ok:
        print(f"surgery: error: {args.output} does not reproduce the masked model "
              f"(max rel diff {out['check']['max_rel_diff']:.3g} > 1e-4)", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- demo

def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(output=args.output, epochs=args.epochs, seed=args.seed, threads=args.threads)
    return 0


COMMANDS = {"inspect": cmd_inspect, "compress": cmd_compress, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    # torch deprecates torch.jit.* with FutureWarnings; they say nothing about the user's model
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    try:
        return COMMANDS[args.command](args)
    except SurgeryError as e:
        if args.debug:
            raise
        print(f"surgery: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("surgery: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `surgery inspect ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
