"""The channel analysis: which channels of which tensors are coupled, as channel groups.

:mod:`~surgery.channels.groups` holds the group model and the walk over the graph,
:mod:`~surgery.channels.rulebook` the rule table and the helpers to write rules (it imports no
rules), :mod:`~surgery.channels.rules` the standard rules, one file per family.
"""
from .groups import (ATTENTION_UNITS, ChannelGraph, ChannelGroup, Place, analyze, analyze_tree, channel_groups,
                     group_of, set_analysis)
from .rulebook import RULES, Rule, RuleContext, channel_local, frozen, passthrough, register_rule, varying

__all__ = ["ChannelGroup", "Place", "ChannelGraph", "channel_groups", "group_of", "analyze", "analyze_tree", "RULES",
           "set_analysis", "ATTENTION_UNITS",
           "Rule", "RuleContext", "register_rule", "passthrough", "channel_local", "frozen", "varying"]
