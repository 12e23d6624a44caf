"""Shrink: masks become a physically smaller model, exactly equal to the masked one.

:mod:`~surgery.shrink.plan` decides what goes and why (the Decider), :mod:`~surgery.shrink.edits`
applies the decisions to modules and the graph (the Editor), :mod:`~surgery.shrink.apply` is the
entry point that passes call: plan, edit, verify, report.
"""
from .apply import ShrinkReport, nested_errors, shrink, shrink_report
from .pruning_plan import apply_plan, load_plan, load_pruned, save_plan, save_pruned

__all__ = ["ShrinkReport", "shrink", "shrink_report", "nested_errors", "apply_plan", "load_plan", "load_pruned",
           "save_plan", "save_pruned"]
