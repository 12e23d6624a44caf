"""Which line of the model's own code asked a question or raised: the first frame outside torch.fx
and surgery, as ``file:line (code)``, for the messages of capture's guards and trace failures."""
from __future__ import annotations

import linecache
import os
import sys

__all__ = ["caller_line", "failing_line"]


def _model_code(filename: str) -> bool:
    name = filename.replace(os.sep, "/")
    return "/torch/fx/" not in name and "/surgery/" not in name


def _where(filename: str, lineno: int) -> str:
    line = linecache.getline(filename, lineno).strip()
    return f"{os.path.basename(filename)}:{lineno} ({line})"


def caller_line() -> str:
    """``file:line (code)`` of the model's code that asked the question (the first frame outside
    torch.fx and surgery), for the guard's message."""
    frame = sys._getframe(2)
    while frame is not None:
        if _model_code(frame.f_code.co_filename):
            return _where(frame.f_code.co_filename, frame.f_lineno)
        frame = frame.f_back
    return "?"


def failing_line(error: BaseException) -> str | None:
    """``file:line (code)`` of the model's code where a trace failed: the innermost frame of the
    error's traceback outside torch and surgery (None when there is none)."""
    found, tb = None, error.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if _model_code(name) and "/torch/" not in name:
            found = _where(tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    return found
