"""surgery: model surgery for PyTorch.

    >>> import surgery
    >>> gm = surgery.compress(model, passes=[...], example_inputs=(x,))
"""
from . import graph
from .activation_stats import activation_sparsity, harden
from .analysis import bits_analysis, sensitivity
from .archive import load, save
from .capture import capture
from .channels import RULES, ChannelGroup, channel_groups, group_of, register_rule
from .errors import ExportFailure, SelectionError, ShrinkMismatch, SurgeryError, TraceFailure, UnsafeFile
from .export import export, load_torchscript
from .files import load_model_file
from .inspect import summary
from .memory import activation_memory
from .pipeline import Context, Mask, Pass, UnitMask, compress, masks, penalty, step
from .select import select_modules, select_nodes
from .shapes import ShapeProp
from .shrink import ShrinkReport, shrink, shrink_report
from .storage import compressed_size
from .weights import finalize

__version__ = "0.1.0"

__all__ = [
    # capture and the pipeline
    "capture", "ShapeProp", "compress", "masks", "penalty", "step", "Context", "Mask", "Pass", "UnitMask",
    "select_modules", "select_nodes", "graph",
    # channel groups, shrink, export
    "ChannelGroup", "RULES", "channel_groups", "group_of", "register_rule",
    "shrink", "ShrinkReport", "shrink_report", "export", "load_torchscript",
    # learnable masks and activations
    "harden", "activation_sparsity", "activation_memory",
    # weights and storage
    "finalize", "sensitivity", "bits_analysis", "compressed_size", "save", "load",
    # inspection
    "summary", "load_model_file",
    # errors
    "SurgeryError", "TraceFailure", "SelectionError", "ShrinkMismatch", "UnsafeFile", "ExportFailure",
]
