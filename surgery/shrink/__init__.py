"""Shrink: masks become a physically smaller model, exactly equal to the masked one.

:mod:`~surgery.shrink.plan` decides what goes and why (the Decider), :mod:`~surgery.shrink.edits`
applies the decisions to modules and the graph (the Editor), :mod:`~surgery.shrink.apply` is the
entry point that passes call: plan, edit, verify, report.
"""
from .apply import ShrinkReport, shrink, shrink_report

__all__ = ["ShrinkReport", "shrink", "shrink_report"]
