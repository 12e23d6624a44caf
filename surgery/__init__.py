"""surgery: model surgery for PyTorch.

The core (capture, shapes, graph, copying, select, verify, errors, pipeline) sits at the top of
the package; the layers above it are subpackages: ``channels`` (the channel analysis),
``shrink``, ``io`` (files, export, archive, inspect, MACs), ``weights``, ``activations`` and
``app`` (cli, demo, recipe). See the README's "Layout" section.

    >>> import surgery
    >>> gm = surgery.compress(model, passes=[...], example_inputs=(x,))
"""
from . import graph
from .activations import activation_memory, activation_sparsity, harden
from .capture import capture
from .channels import RULES, ChannelGroup, channel_groups, group_of, register_rule
from .errors import (BadModelFile, ConfigError, ExportFailure, ExportMismatch, SelectionError, ShapePropagationFailure,
                     ShrinkMismatch, SurgeryError, TraceFailure, UnsafeFile)
from .io import export, load, load_deployed, load_model_file, load_torchscript, save, summary, verify_export
from .pipeline import Context, Mask, Pass, UnitMask, compress, masks, penalty, step
from .select import select_modules, select_nodes
from .shapes import ShapeProp
from .shrink import (ShrinkReport, apply_plan, load_plan, load_pruned, nested_errors, save_plan, save_pruned, shrink,
                     shrink_report)
from .weights import bits_analysis, compressed_size, finalize, sensitivity

__version__ = "0.1.0"

__all__ = [
    # capture and the pipeline
    "capture", "ShapeProp", "compress", "masks", "penalty", "step", "Context", "Mask", "Pass", "UnitMask",
    "select_modules", "select_nodes", "graph",
    # channel groups, shrink, export
    "ChannelGroup", "RULES", "channel_groups", "group_of", "register_rule",
    "shrink", "ShrinkReport", "shrink_report", "nested_errors", "export", "load_torchscript",
    "verify_export", "load_deployed",
    # the pruned model in its own classes: its plan, saved and loaded without pickle
    "save_plan", "load_plan", "apply_plan", "save_pruned", "load_pruned",
    # learnable masks and activations
    "harden", "activation_sparsity", "activation_memory",
    # weights and storage
    "finalize", "sensitivity", "bits_analysis", "compressed_size", "save", "load",
    # inspection
    "summary", "load_model_file",
    # errors
    "SurgeryError", "TraceFailure", "ShapePropagationFailure", "SelectionError", "ConfigError", "ShrinkMismatch",
    "BadModelFile", "UnsafeFile", "ExportFailure", "ExportMismatch",
]
