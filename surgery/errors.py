"""Errors raised by surgery. Every error names its culprit: a module path, a node, a file."""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Sequence


def first_line(e: BaseException) -> str:
    """``"TypeName: first non-blank line of the message"``: how errors from other libraries are
    quoted inside ours."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


class SurgeryError(Exception):
    """Root of every error surgery raises on purpose."""


class TraceFailure(SurgeryError):
    """torch.fx could not trace the model's top-level forward."""

    def __init__(self, module_path: str, fx_error: BaseException | str, hint: str = ""):
        self.module_path = module_path or "<root>"
        self.fx_error = fx_error
        self.hint = hint or (
            "pass concrete_args= for arguments that steer control flow, or leaf_modules= "
            "to keep the offending submodules opaque"
        )
        err = f"{type(fx_error).__name__}: {fx_error}" if isinstance(fx_error, BaseException) else fx_error
        super().__init__(
            f"cannot trace the forward of {self.module_path!r}: {err}\n  try: {self.hint}"
        )


class ShapePropagationFailure(TraceFailure):
    """Running the captured graph on the example inputs (to record shapes) failed.

    Names the node, the module it belongs to and the forward arguments that feed it; the
    layer's own error is its ``__cause__``.
    """

    def __init__(self, module_path: str, node: str | None, error: BaseException, hint: str = ""):
        self.module_path, self.node, self.fx_error = module_path, node, error
        self.hint = hint or ("check the example inputs against what the forward expects; where the trace took "
                             "a branch these inputs do not take, pass concrete_args= for the arguments that steer it")
        text = str(error).split("\n\nWhile executing")[0].strip()
        at = f" at node {node!r}" if node else ""
        Exception.__init__(self, f"running the captured graph on the example inputs failed{at} in module "
                                 f"{module_path!r}: {type(error).__name__}: {text}\n  try: {self.hint}")


class SelectionError(SurgeryError):
    """A selector matched nothing (or something it must not)."""

    def __init__(self, message: str, nearest: Sequence[str] = ()):
        self.nearest = list(nearest)
        if self.nearest:
            message += "; nearest names: " + ", ".join(self.nearest)
        super().__init__(message)


class ConfigError(SurgeryError):
    """A configuration value is invalid: a pass field, a recipe key, a function argument.

    Names the owner (``ChannelPrune``, or ``recipe.toml [[passes]] #2 (ChannelPrune)``), the
    field, the value given and what is allowed.
    """

    def __init__(self, owner: str, field: str, value: Any, allowed: str):
        self.owner, self.field, self.value, self.allowed = owner, field, value, allowed
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{owner}: {field} = {shown}: {allowed}")


class ShrinkMismatch(SurgeryError):
    """The shrunk model does not compute what the masked model computes."""

    def __init__(self, max_error: float, first_node: str | None = None, detail: str = ""):
        self.max_error = max_error
        self.first_node = first_node
        msg = f"shrunk model differs from the masked model: max abs error {max_error:.3g}"
        if first_node:
            msg += f", first differing node {first_node!r}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class BadModelFile(SurgeryError):
    """A file that is missing, not a regular file, empty, truncated, corrupt or holds no model."""

    def __init__(self, path: str | os.PathLike[str], problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{self.path}: {problem}")


class UnsafeFile(SurgeryError):
    """A file needs full unpickling (which can run code) and the user did not trust it."""

    def __init__(self, path: str, reason: str = ""):
        self.path = str(path)
        msg = (
            f"{self.path}: refusing to unpickle: loading it needs full pickle, which can run "
            "arbitrary code; pass --trust (trust=True) only if you trust where the file came from"
        )
        if reason:
            msg += f" [{reason}]"
        super().__init__(msg)


class ExportFailure(SurgeryError):
    """Export failed, or the reloaded file did not reproduce the model."""


class ExportMismatch(ExportFailure):
    """A written file (.pt2, .onnx), reloaded as deployment reloads it, does not reproduce the
    model: see :func:`surgery.verify_export`. `error`: the largest relative error, where the file
    ran and its outputs compared (None otherwise)."""

    def __init__(self, message: str, error: float | None = None):
        super().__init__(message)
        self.error = error


_OURS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), p) + os.sep
              for p in ("surgery", "passes"))


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the user's line: the first caller outside surgery and passes (and the
    decorators they wear: contextlib's, torch.no_grad's), however deep the warning was raised."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename.startswith(_OURS)
                                 or frame.f_code.co_filename.endswith("contextlib.py")):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
