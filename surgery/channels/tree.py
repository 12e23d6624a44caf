"""A model's channel analysis as a whole: its captured graph, and the graphs nested under eager
code in it (a detection model's backbone and heads, see :mod:`surgery.nested`), with the
settings that every analysis of the same model must share.

Example::

    >>> import torch, surgery
    >>> from torch import nn
    >>> from surgery.channels import analyze_tree
    >>> gm = surgery.capture(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), (torch.randn(1, 4),))
    >>> list(analyze_tree(gm))
    ['']
"""
from __future__ import annotations

import torch.fx as fx

from ..copying import gc_paused
from ..nested import nested_graphs
from .boundary import Boundary, annotated, handoff_components, prepare, shared_tensors
from .groups import ChannelGraph, ChannelGroup, analyze
from .rulebook import RULES

__all__ = ["analyze_tree", "set_analysis", "channel_groups", "ATTENTION_UNITS"]


@gc_paused()
def analyze_tree(gm: fx.GraphModule) -> dict[str, ChannelGraph]:
    """The analysis of `gm`'s graph and of every traced graph nested under eager code in it (a
    shell's children; see :mod:`surgery.nested`), by qualified module path ("" for `gm` itself),
    each found from its groups' ``graph``. Group ids run on across the graphs. A nested graph is
    analysed within its boundary (:mod:`~surgery.channels.boundary`); one that the example run
    never called has no shapes and is left out: nothing in it is pruned. Graphs that eager code
    hands tensors between, unchanged, are analysed as one (keyed by the first one's path;
    ``parts`` lists them), so channels are followed from a backbone into its head."""
    tree = {"": analyze(gm)}
    subs = nested_graphs(gm)
    if not subs:  # the common case: one graph, analysed as it always was
        return tree
    shared, first = shared_tensors(gm), len(tree[""].groups)
    options = {k: v for k, v in gm.meta.get("surgery", {}).items() if k in ("attention_units", "normalised")}
    for sub in subs.values():
        sub.meta.setdefault("surgery", {}).update(options)  # nested graphs take their root's settings
    subs = {path: sub for path, sub in subs.items() if annotated(sub)}
    for sub in subs.values():
        prepare(sub)
    for paths in handoff_components(subs):  # graphs that eager code hands tensors between, walked as one
        parts = [(subs[p], Boundary(p, shared)) for p in paths]
        tree[paths[0]] = ChannelGraph(*parts[0], first, linked=parts[1:]).run()
        first += len(tree[paths[0]].groups)
    return tree


ATTENTION_UNITS = ("heads", "head_dims")  # what a unit of attention may be


def set_analysis(gm: fx.GraphModule, attention: str = "heads", normalised: bool = True) -> None:
    """How the analysis of `gm` (and of the graphs nested in it) treats two structures, kept in
    ``gm.meta["surgery"]`` so that a later analysis of the same graph (Shrink's) agrees: attention
    by whole "heads" or by "head_dims" (see :mod:`surgery.channels.rules.attention`); and whether
    channels that a norm or a mean over channels reads may go (`normalised`; see
    :func:`surgery.channels.rules.common.normalised`)."""
    if attention not in ATTENTION_UNITS:
        raise ValueError(f"attention units are 'heads' or 'head_dims', not {attention!r}")
    gm.meta.setdefault("surgery", {}).update(attention_units=attention, normalised=bool(normalised))


def channel_groups(gm: fx.GraphModule, rules: dict | None = None) -> list[ChannelGroup]:
    """The channel groups of a captured GraphModule (captured with example_inputs), those of
    the graphs nested under eager code in it included (``group.graph`` names each one's graph).

    `rules` adds or overrides rules for this call only (same keys as :data:`RULES`).
    """
    saved = dict(RULES) if rules else None
    RULES.update(rules or {})
    try:
        return [g for cg in analyze_tree(gm).values() for g in cg.groups]
    finally:
        if saved is not None:
            RULES.clear()
            RULES.update(saved)
