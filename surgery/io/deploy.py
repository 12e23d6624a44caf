"""The deployed formats beside TorchScript: ``torch.export`` programs (``.pt2``) and ONNX.

Each is written, reloaded the way a deployment reloads it (``torch.export.load``; an ONNX
Runtime session on the CPU execution provider) and verified against the model on the example
inputs and on a second batch size, as :func:`surgery.export` does for TorchScript. The batch
dimension (and, for integer token inputs, the sequence dimension) is declared dynamic where the
model's graph allows it; where it does not, the file keeps the example's sizes and a warning
says so. :func:`verify_export` checks a file again later (a copied or edited file), raising
:class:`~surgery.errors.ExportMismatch` when it no longer reproduces the model.

ONNX needs the ``export`` extra (``pip install 'surgery[export]'``: onnx, onnxscript,
onnxruntime). :mod:`surgery.io.deployed` reads a file without unpickling anything.

Example::

    >>> import torch, surgery
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> path = surgery.export(net, "/tmp/small.pt2", example_inputs=(torch.randn(3, 4),))
    >>> torch.export.load(str(path)).module()(torch.randn(5, 4)).shape   # any batch size
    torch.Size([5, 2])
"""
from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..calling import as_inputs, call
from ..errors import ExportFailure, ExportMismatch, first_line, warn
from ..verify import _flatten, eval_mode, max_rel_diff, rounding_only, run_eval

__all__ = ["FORMATS", "format_of", "export_pt2", "export_onnx", "load_deployed", "verify_export",
           "second_batch"]

FORMATS = {".pt": "torchscript", ".ts": "torchscript", ".pt2": "pt2", ".onnx": "onnx"}
_ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")


def format_of(path: str | os.PathLike, format: str | None = None) -> str:
    """The format to write `path` in: `format` when given, else from the suffix."""
    if format is not None:
        if format not in set(FORMATS.values()):
            raise ExportFailure(f"{path}: format must be one of 'torchscript', 'pt2', 'onnx', got {format!r}")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ExportFailure(f"{path}: cannot tell the format from the suffix {suffix!r}: use .pt or .ts "
                            "(TorchScript), .pt2 (torch.export) or .onnx, or pass format=")
    return FORMATS[suffix]


def _need_onnx(path: Any) -> None:
    missing = [m for m in _ONNX_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportFailure(f"{path}: ONNX needs {', '.join(missing)}, which is not installed: "
                            "pip install 'surgery[export]'")


# ----------------------------------------------------------------------------- batch sizes
def _tensors(inputs: tuple | dict[str, Any]) -> list[tuple[Any, torch.Tensor]]:
    items = inputs.items() if isinstance(inputs, dict) else enumerate(inputs)
    return [(k, v) for k, v in items if isinstance(v, torch.Tensor)]


def _batch(inputs: tuple | dict[str, Any]) -> int | None:
    """The batch size every tensor input shares along its first axis (None: no such axis)."""
    sizes = {v.shape[0] for _, v in _tensors(inputs) if v.dim() > 0}
    plain = all(isinstance(v, torch.Tensor) or v is None or isinstance(v, (bool, int, float, str))
                for v in (inputs.values() if isinstance(inputs, dict) else inputs))
    return sizes.pop() if len(sizes) == 1 and plain else None


def second_batch(inputs: tuple | dict[str, Any], size: int) -> tuple | dict[str, Any]:
    """`inputs` with every tensor's first axis made `size` long by cycling its rows (real
    values: token ids stay ids)."""
    def grow(v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return v
        idx = torch.arange(size, device=v.device) % v.shape[0]
        return v.index_select(0, idx)
    if isinstance(inputs, dict):
        return {k: grow(v) for k, v in inputs.items()}
    return tuple(grow(v) for v in inputs)


def _dynamic_axes(v: Any) -> list[int]:
    """The axes of one input declared dynamic: the batch axis of every tensor, and the sequence
    axis of a 2-D integer input (token ids, their masks). Each stays dynamic where the graph allows."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0:
        return []
    return [0, 1] if v.dim() == 2 and not v.is_floating_point() else [0]


def _dynamic_shapes(inputs: tuple | dict[str, Any]) -> Any:
    """:func:`_dynamic_axes` as torch.export's ``dynamic_shapes`` (Dim.AUTO)."""
    def spec(v: Any) -> dict | None:
        return {d: torch.export.Dim.AUTO for d in _dynamic_axes(v)} or None
    return {k: spec(v) for k, v in inputs.items()} if isinstance(inputs, dict) else tuple(map(spec, inputs))


class _Plain(nn.Module):
    """`model` for the TorchScript-based exporter: positional tensors only (keyword inputs by
    `names`, other keyword values fixed), and no ``graph`` attribute (it takes a GraphModule's
    fx.Graph for a TorchScript graph when it names dynamic axes)."""

    def __init__(self, model: nn.Module, kwargs: dict[str, Any]):
        super().__init__()
        self.model, self.names = model, [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        self.fixed = {k: v for k, v in kwargs.items() if k not in self.names}

    def forward(self, *args: Any) -> Any:
        return self.model(*args[len(self.names):], **dict(zip(self.names, args)), **self.fixed) if self.names \
            else self.model(*args)


def _legacy_axes(inputs: tuple | dict[str, Any], dynamic: bool = True) -> dict[str, Any]:
    """:func:`_dynamic_axes` as the TorchScript-based ONNX exporter's input_names and dynamic_axes
    (none when not `dynamic`)."""
    items = inputs.items() if isinstance(inputs, dict) else ((f"input_{i}", v) for i, v in enumerate(inputs))
    tensors = [(name, v) for name, v in items if isinstance(v, torch.Tensor)]
    return {"input_names": [name for name, _ in tensors],
            "dynamic_axes": {name: {d: f"{name}_dim{d}" for d in _dynamic_axes(v)} for name, v in tensors
                             if dynamic and _dynamic_axes(v)}}


def _args(inputs: tuple | dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    return ((), dict(inputs)) if isinstance(inputs, dict) else (tuple(inputs), {})


# ----------------------------------------------------------------------------- verification
def _leaves(value: Any) -> list[torch.Tensor]:
    return [v for v in _flatten(value)[0] if isinstance(v, torch.Tensor)]


def _compare(ref: Any, out: Any, flat: bool) -> float:
    """max rel. error; `flat`: `out` is the list of output tensors a flat format returns."""
    if flat:
        ref = _leaves(ref)
        if len(ref) != len(out):
            raise ValueError(f"the file returns {len(out)} tensors, the model {len(ref)}")
    return max_rel_diff(ref, out)


class _OnnxRunner:
    """An ONNX Runtime session (CPU) called like the model: positional or keyword tensors in,
    the list of output tensors out."""

    def __init__(self, path: str | os.PathLike):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *args: Any, **kwargs: Any) -> list[torch.Tensor]:
        given = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        if len(given) != len(self.names):
            raise ExportFailure(f"the ONNX file takes {len(self.names)} input(s) ({', '.join(self.names)}), "
                                f"got {len(given)} tensors")
        feed = {n: v.detach().cpu().numpy() for n, v in zip(self.names, given)}
        return [torch.from_numpy(o) for o in self.session.run(None, feed)]


def load_deployed(path: str | os.PathLike, format: str | None = None) -> Callable[..., Any]:
    """A callable that runs the file as deployment runs it: the ``torch.export`` program's module,
    or an ONNX Runtime session (returning a list of tensors). ``.pt2`` files are unpickled by
    ``torch.export.load``: load only files you trust (:func:`read_pt2` reads one without)."""
    kind = format_of(path, format)
    if kind == "pt2":
        return torch.export.load(str(path)).module()
    if kind == "onnx":
        _need_onnx(path)
        return _OnnxRunner(path)
    raise ExportFailure(f"{path}: load_deployed reads .pt2 and .onnx files (TorchScript: torch.jit.load)")


def verify_export(path: str | os.PathLike, model: nn.Module, example_inputs: Any, *, tol: float = 1e-5,
                  batch: int | None = None, format: str | None = None) -> float:
    """Reload `path` (.pt2 or .onnx) as deployment does and run it on `example_inputs` (and, with
    `batch`, on them grown to that batch size): raise :class:`ExportMismatch` where it differs
    from `model` by more than `tol` relative to each output's largest magnitude, unless it
    differs by float32 rounding only: it is no further from the model run in float64 than
    twice the model's own float32 run (:func:`surgery.verify.rounding_only`). Returns the
    largest relative error seen."""
    kind = format_of(path, format)
    inputs = as_inputs(example_inputs, model)
    runner = load_deployed(path, kind)
    worst = 0.0
    for example in (inputs, *([second_batch(inputs, batch)] if batch else [])):
        ref = run_eval(model, example)
        try:
            with torch.no_grad():
                out = call(runner, example)
        except Exception as e:
            raise ExportMismatch(f"{path}: the reloaded file cannot run on inputs of batch "
                                 f"{_batch(example)} ({first_line(e)})") from e
        try:
            err = _compare(ref, out, flat=kind == "onnx")
        except ValueError as e:
            raise ExportMismatch(f"{path}: the reloaded file's outputs differ from the model's ({e})") from e
        if not err <= tol:
            ok, found = rounding_only(model, example, ref, out, lambda a, b: _compare(a, b, flat=kind == "onnx"))
            if not ok:
                raise ExportMismatch(f"{path}: the reloaded file differs from the model at batch {_batch(example)} "
                                     f"(max rel. error {err:.3g} > {tol:g}{found})", error=err)
        worst = max(worst, err)
    return worst


# ----------------------------------------------------------------------------- writing
def _exported(model: nn.Module, inputs: tuple | dict[str, Any], dynamic: bool) -> torch.export.ExportedProgram:
    args, kwargs = _args(inputs)
    shapes = _dynamic_shapes(inputs) if dynamic else None
    return torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)


def _batched(program: torch.export.ExportedProgram) -> bool:
    """Whether the program's first user input has a symbolic first axis."""
    for node in program.graph.find_nodes(op="placeholder"):
        if node.name in program.graph_signature.user_inputs:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() > 0:
                size = val.shape[0]  # a SymInt may stand for a size torch.export specialised
                return isinstance(size, torch.SymInt) and bool(size.node.expr.free_symbols)
    return False


def _example(inputs: tuple | dict[str, Any]) -> tuple[tuple | dict[str, Any], int | None]:
    """The inputs to export on (a batch of one grown to two: a size of 1 would be specialised),
    and the second batch size to verify at (None: no common batch axis)."""
    b = _batch(inputs)
    if b is None:
        return inputs, None
    return (second_batch(inputs, 2) if b == 1 else inputs), b + 1


def export_pt2(model: nn.Module, path: Path, inputs: tuple | dict[str, Any], tol: float) -> Path:
    """``torch.export.export`` then ``torch.export.save``, reloaded and verified (see the module doc)."""
    example, second = _example(inputs)
    with eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = _exported(model, example, dynamic=second is not None)
        except Exception as e:  # a graph that cannot take a dynamic batch: the example's sizes
            try:
                program, second = _exported(model, inputs, dynamic=False), None
            except Exception:
                raise ExportFailure(f"{path}: torch.export cannot export {type(model).__name__}: "
                                    f"{first_line(e)}") from e
        if second is not None and not _batched(program):
            second = None
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(path))
    _verified(path, model, inputs, tol, second, "pt2")
    return path


def export_onnx(model: nn.Module, path: Path, inputs: tuple | dict[str, Any], tol: float) -> Path:
    """``torch.onnx.export`` then an ONNX Runtime session, verified.

    Tried in order, the first file that verifies kept: the dynamo exporter with a dynamic batch
    (on the example grown to batch 2), with the inputs' sizes, and both once more without its graph
    optimizer (which has written graphs ONNX Runtime rejects, timm's Gemma-4 ViT); then the
    TorchScript-based exporter, deprecated but still shipped, the same two ways (torch 2.14's dynamo
    exporter decomposes a reshape of a transposed attention output into an impossible view: HF T5
    and Swin, timm BEiT; and fails on graphs that write the batch into a reshape: timm BoTNet)."""
    _need_onnx(path)
    example, second = _example(inputs)
    tries = ([(example, True)] if second is not None else []) + [(inputs, False)]
    candidates = [("dynamo", given, dynamic, optimize) for optimize in (True, False) for given, dynamic in tries] + \
        [("TorchScript-based", given, dynamic, True) for given, dynamic in tries]
    path.parent.mkdir(parents=True, exist_ok=True)
    errors: dict[str, str] = {}
    closest = float("inf")  # the smallest error of a file that ran but missed `tol`
    for how, given, dynamic, optimize in candidates:
        args, kwargs = _args(given)
        try:
            with eval_mode(model), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if how == "dynamo":
                    torch.onnx.export(model, args, str(path), kwargs=kwargs or None, dynamo=True, external_data=False,
                                      dynamic_shapes=_dynamic_shapes(given) if dynamic else None,
                                      optimize=optimize, verbose=False)
                else:
                    plain = _Plain(model, kwargs)
                    torch.onnx.export(plain, tuple(kwargs[k] for k in plain.names) + args, str(path), dynamo=False,
                                      **_legacy_axes(given, dynamic))
            batch = second if dynamic and _onnx_batched(path) else None
            verify_export(path, model, inputs, tol=tol, batch=batch, format="onnx")
        except Exception as e:
            errors.setdefault(how, first_line(e))
            if isinstance(e, ExportMismatch) and e.error is not None:
                closest = min(closest, e.error)
            continue
        _warn_fixed_batch(path, model, inputs, batch, "onnx")
        return path
    path.unlink(missing_ok=True)
    hint = "" if closest == float("inf") else \
        (f"; one file ran and matched the model to a relative error of {closest:.3g}, above tol={tol:g} and more "
         f"than float32 rounding explains: where that is close enough, pass a larger tol")
    raise ExportFailure(f"{path}: torch.onnx.export cannot export {type(model).__name__}: {errors.get('dynamo')} "
                        f"(and the TorchScript-based exporter: {errors.get('TorchScript-based')}){hint}")


def _onnx_batched(path: Path) -> bool:
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    init = {t.name for t in graph.initializer}
    dims = [v.type.tensor_type.shape.dim for v in graph.input if v.name not in init]
    return bool(dims) and all(len(d) > 0 and not d[0].HasField("dim_value") for d in dims if len(d))


def _verified(path: Path, model: nn.Module, inputs: Any, tol: float, second: int | None, kind: str) -> None:
    try:
        verify_export(path, model, inputs, tol=tol, batch=second, format=kind)
    except ExportMismatch:
        path.unlink(missing_ok=True)
        raise
    _warn_fixed_batch(path, model, inputs, second, kind)


def _warn_fixed_batch(path: Path, model: nn.Module, inputs: Any, second: int | None, kind: str) -> None:
    if second is None and _batch(inputs) is not None:
        warn(f"{path}: {type(model).__name__}'s graph fixes the batch size, so the {kind} file takes "
             f"inputs of batch {_batch(inputs)} only")
