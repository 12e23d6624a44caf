"""surgery: model surgery for PyTorch.

The core (capture, shapes, graph, copying, select, verify, errors, pipeline) sits at the top of
the package; the layers above it are subpackages: ``channels`` (the channel analysis),
``shrink``, ``io`` (files, export, archive, inspect, MACs), ``weights``, ``activations`` and
``app`` (cli, demo, recipe). See the README's "Layout" section.

    >>> import surgery
    >>> gm = surgery.compress(model, passes=[...], example_inputs=(x,))
"""
import importlib
import sys
import types
from typing import Any

# name -> (module, attribute; None: the module itself). Loaded on first use, so that `import
# surgery` (and the command line's --version, --help and file errors) costs no torch import.
_LAZY: dict[str, tuple[str, str | None]] = {
    "graph": (".graph", None),
    **{n: (".activations", n) for n in ("activation_memory", "activation_sparsity", "harden")},
    "capture": (".capture", "capture"),
    **{n: (".channels", n) for n in ("RULES", "ChannelGroup", "channel_groups", "group_of", "register_rule")},
    **{n: (".errors", n) for n in ("BadModelFile", "ConfigError", "ExportFailure", "ExportMismatch", "SelectionError",
                                   "ShapePropagationFailure", "ShrinkMismatch", "SurgeryError", "TraceFailure",
                                   "UnsafeFile")},
    **{n: (".io", n) for n in ("export", "load", "load_deployed", "load_model_file", "load_torchscript", "save",
                               "summary", "verify_export")},
    **{n: (".pipeline", n) for n in ("Context", "Mask", "Pass", "UnitMask", "compress", "masks", "penalty", "step")},
    **{n: (".select", n) for n in ("select_modules", "select_nodes")},
    "ShapeProp": (".shapes", "ShapeProp"),
    **{n: (".shrink", n) for n in ("ShrinkReport", "apply_plan", "load_plan", "load_pruned", "nested_errors",
                                   "save_plan", "save_pruned", "shrink", "shrink_report")},
    **{n: (".weights", n) for n in ("bits_analysis", "compressed_size", "finalize", "sensitivity")},
}
# functions named like the submodule that defines them: the package attribute is the function
_SHADOWED = frozenset({"capture", "shrink"})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = importlib.import_module(module, __name__)
        value = getattr(value, attr) if attr else value
    else:  # a submodule not imported yet (surgery.channels, surgery.io ...)
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Importing ``surgery.capture`` or ``surgery.shrink`` (the submodules) binds them to the
    package's attribute; read through the package, the name still gives the function."""

    def __getattribute__(self, name: str) -> Any:
        value = super().__getattribute__(name)
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return getattr(value, name)
        return value


sys.modules[__name__].__class__ = _Package

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
