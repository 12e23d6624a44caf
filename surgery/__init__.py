"""surgery: model surgery for PyTorch.

    >>> import surgery
    >>> gm = surgery.compress(model, passes=[...], example_inputs=(x,))
"""
from .capture import ShapeProp, capture
from .errors import ExportFailure, SelectionError, ShrinkMismatch, SurgeryError, TraceFailure, UnsafeFile
from .pipeline import Context, Mask, Pass, UnitMask, compress, masks, penalty, step
from .select import select_modules, select_nodes

__version__ = "0.1.0"

__all__ = [
    "capture", "ShapeProp", "compress", "masks", "penalty", "step", "Context", "Mask", "Pass", "UnitMask",
    "select_modules", "select_nodes",
    "SurgeryError", "TraceFailure", "SelectionError", "ShrinkMismatch", "UnsafeFile", "ExportFailure",
]
from .memory import activation_memory  # noqa: E402
__all__ += ["activation_memory"]
