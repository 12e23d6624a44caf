"""Export: files that run without surgery, reloaded and verified before returning: TorchScript
here, ``torch.export`` programs (.pt2) and ONNX in :mod:`surgery.io.deploy`, chosen by the suffix.

TorchScript stays (the pruned models of the mission are TorchScript files, and ``torch.jit.load``
still reads them), but PyTorch deprecates it in favour of ``torch.export``: new deployments
should write .pt2 (ExecuTorch, AOTInductor) or .onnx (ONNX Runtime, TensorRT). Our own calls keep
TorchScript's deprecation warnings from the user.

Example::

    >>> import torch, surgery
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = torch.randn(3, 4)
    >>> path = surgery.export(net, "/tmp/small.pt", example_inputs=(x,))
    >>> torch.jit.load(str(path))(x).shape      # plain torch, no surgery needed
    torch.Size([3, 2])
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..calling import as_inputs, call
from ..errors import ExportFailure, first_line
from ..progress import staged
from ..verify import eval_mode, max_rel_diff, rounding_only, run_eval
from .deploy import export_onnx, export_pt2, format_of

__all__ = ["export", "load_torchscript"]


def _close(model: nn.Module, inputs: Any, ref: Any, out: Any, tol: float) -> tuple[bool, str]:
    """Whether the reloaded file's `out` matches the model's `ref` (within `tol`, or by float32
    rounding only: see :func:`surgery.verify.rounding_only`), and why not."""
    try:
        err = max_rel_diff(ref, out)
    except ValueError as e:
        return False, str(e)
    if err <= tol:
        return True, ""
    ok, found = rounding_only(model, inputs, ref, out)
    return ok, f"max rel. error {err:.3g} > {tol:g}{found}"


def _trace(model: nn.Module, inputs: tuple | dict[str, Any], ref: Any) -> torch.jit.ScriptModule:
    """``torch.jit.trace``, with keyword inputs as ``example_kwarg_inputs``. A dict or list output
    (a Hugging Face ModelOutput is a dict) needs ``strict=False``: the file then returns a plain
    dict, compared by value."""
    strict = not any(isinstance(v, (dict, list)) for v in _containers(ref))
    if isinstance(inputs, dict):
        return torch.jit.trace(model, example_kwarg_inputs=inputs, check_trace=False, strict=strict)
    return torch.jit.trace(model, inputs, check_trace=False, strict=strict)


def _containers(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [value, *(c for v in value for c in _containers(v))]
    if isinstance(value, dict):
        return [value, *(c for v in value.values() for c in _containers(v))]
    return []


@staged(lambda model, path, *a, **k: f"export {path} and verify it")
def export(model: nn.Module, path: str | os.PathLike, example_inputs: Any, *, format: str | None = None,
           method: str = "auto", freeze: bool = False, tol: float = 1e-5) -> Path:
    """Write `model` (in eval mode) to `path`, reload it as deployment does, check it reproduces
    `model` on `example_inputs`, return the path.

    `format` is taken from the suffix unless given: ".pt"/".ts" TorchScript ("torchscript"),
    ".pt2" a ``torch.export`` program ("pt2"), ".onnx" ONNX ("onnx", the ``export`` extra). A
    .pt2 or .onnx file is written with a dynamic batch axis (and sequence axis for integer token
    inputs) where the graph allows, and verified at a second batch size too (see
    :mod:`surgery.io.deploy`); the rest of this describes TorchScript.

    `method`: "script", "trace", or "auto" (script, and trace where scripting fails or does not
    reproduce the model). The file needs only torch to load: no surgery, no model classes.

    ``freeze=True`` writes an inference-only file (``torch.jit.freeze``: parameters become
    constants, training branches and attributes are gone), which is what to deploy. On CPU,
    a process that calls ``torch.jit.enable_onednn_fusion(True)`` before running the loaded
    file gets conv/BatchNorm/ReLU/add fused into oneDNN Graph kernels; for a shrunk ResNet-50
    that is what turns the MAC reduction into latency (see benchmarks/results/shrink_latency.md).

    The file passes when its outputs are within `tol` of the model's (relative to each output's
    largest magnitude), or differ from them by float32 rounding only: no further from the model
    run in float64 than twice the model's own float32 run (:func:`surgery.verify.rounding_only`;
    a model whose float32 outputs amplify rounding, such as a deep ViT with random weights, is
    reproduced by another runtime to no better than that).

    `example_inputs` may be keyword inputs (a dict): scripting keeps the forward's argument
    names, tracing records them with ``example_kwarg_inputs``, and the reloaded file is checked
    by calling it with the same keywords.

    Raises :class:`ExportFailure` naming the file and the reason.
    """
    inputs = as_inputs(example_inputs, model)
    if inputs is None:
        raise ExportFailure(f"{path}: export needs example_inputs to verify the file")
    kind = format_of(path, format)
    if kind == "pt2":
        return export_pt2(model, Path(path), inputs, tol)
    if kind == "onnx":
        return export_onnx(model, Path(path), inputs, tol)
    if method not in ("auto", "script", "trace"):
        raise ExportFailure(f"{path}: method must be 'auto', 'script' or 'trace', got {method!r}")
    path = Path(path)
    errors: list[str] = []
    with eval_mode(model):
        ref = run_eval(model, inputs)
        for how in (["script", "trace"] if method == "auto" else [method]):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if how == "script":
                        sm = torch.jit.script(model)
                    else:
                        sm = _trace(model, inputs, ref)
                    sm.eval()
                    if freeze:
                        sm = torch.jit.freeze(sm)
                path.parent.mkdir(parents=True, exist_ok=True)
                sm.save(str(path))
            except Exception as e:  # scripting fails on many Python constructs: try the next way
                errors.append(f"{how}: {first_line(e)}")
                continue
            loaded = load_torchscript(path)
            try:
                with torch.no_grad():
                    out = call(loaded, inputs)
            except Exception as e:  # a file that cannot take the inputs the model took
                errors.append(f"{how}: the reloaded file cannot run on the example inputs ({first_line(e)})")
                continue
            ok, why = _close(model, inputs, ref, out, tol)
            if ok:
                return path
            errors.append(f"{how}: the reloaded file differs from the model ({why})")
    if path.exists():
        path.unlink()
    if isinstance(inputs, dict) and not isinstance(model, fx.GraphModule):
        # torch.jit.trace binds keywords to named tensor parameters only; a captured module names each input
        errors.append("keyword inputs: torch.jit.trace takes them only as tensors for named positional arguments "
                      "of forward (no keyword-only arguments, no **kwargs, no Python numbers); export "
                      "surgery.capture(model, example_inputs) instead, whose forward names every input")
    raise ExportFailure(f"{path}: could not export {type(model).__name__} to TorchScript: " + "; ".join(errors))


def load_torchscript(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """Load an exported TorchScript file (``torch.jit.load``, its deprecation warning kept quiet)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=map_location)
