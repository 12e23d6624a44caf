"""The channel analysis: which channels of which tensors are coupled, as channel groups.

:mod:`~surgery.channels.groups` holds the group model and the walk over the graph,
:mod:`~surgery.channels.tree` the analysis of a model whose graphs eager code calls,
:mod:`~surgery.channels.rulebook` the rule table and the helpers to write rules (it imports no
rules), :mod:`~surgery.channels.rules` the standard rules, one file per family.
"""
from .groups import ChannelGraph, ChannelGroup, Place, analyze, group_of
from .tree import ATTENTION_UNITS, analyze_tree, channel_groups, set_analysis
from .rulebook import RULES, Rule, RuleContext, channel_local, frozen, passthrough, register_rule, varying

__all__ = ["ChannelGroup", "Place", "ChannelGraph", "channel_groups", "group_of", "analyze", "analyze_tree", "RULES",
           "set_analysis", "ATTENTION_UNITS",
           "Rule", "RuleContext", "register_rule", "passthrough", "channel_local", "frozen", "varying"]
