"""surgery: model surgery for PyTorch.

    >>> import surgery
    >>> gm = surgery.compress(model, passes=[...], example_inputs=(x,))
"""
from .capture import ShapeProp, capture
from .errors import ExportFailure, SelectionError, ShrinkMismatch, SurgeryError, TraceFailure, UnsafeFile
from .pipeline import Context, Mask, Pass, UnitMask, compress, masks, penalty, step
from .select import select_modules, select_nodes
from .channels import ChannelGroup, RULES, channel_groups, group_of, register_rule
from .shrink import ShrinkReport, shrink, shrink_report
from .export import export, load_torchscript
from .activation_stats import activation_sparsity, harden

__version__ = "0.1.0"

__all__ = [
    "capture", "ShapeProp", "compress", "masks", "penalty", "step", "Context", "Mask", "Pass", "UnitMask",
    "select_modules", "select_nodes",
    "SurgeryError", "TraceFailure", "SelectionError", "ShrinkMismatch", "UnsafeFile", "ExportFailure",
]
__all__ += ["ChannelGroup", "RULES", "channel_groups", "group_of", "register_rule", "ShrinkReport", "shrink", "shrink_report", "export", "load_torchscript"]
__all__ += ["harden", "activation_sparsity"]
