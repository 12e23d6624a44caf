"""The channel groups of ``surgery inspect --groups``: computed on a copy of the model, as
plain dicts of names (for JSON) and as text lines (for the table).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..capture import capture
from ..channels.tree import channel_groups
from ..copying import copy_module
from ..errors import SurgeryError
from ..shapes import ShapeProp

__all__ = ["channel_groups_of", "format_groups"]


def _group_dicts(groups: Sequence[Any]) -> list[dict[str, Any]]:
    """ChannelGroup objects -> plain dicts of names (for JSON and the table)."""
    def names(items: Any) -> list[str]:
        out = []
        for it in items or ():
            node = getattr(it, "node", it[0] if isinstance(it, tuple) and it else it)
            # a module call is named by its module's qualified name, anything else by the node
            out.append(str(node.target) if getattr(node, "op", None) == "call_module" else
                       str(getattr(node, "name", node)))
        return list(dict.fromkeys(out))

    return [{"id": getattr(g, "id", k), "size": getattr(g, "size", None),
             "producers": names(getattr(g, "producers", ())), "locals": names(getattr(g, "locals", ())),
             "readers": names(getattr(g, "readers", ())), "frozen": getattr(g, "frozen", None) or None}
            for k, g in enumerate(groups)]


def channel_groups_of(model: nn.Module, inputs: tuple | None) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The channel groups of `model` as dicts, or (None, reason) when they cannot be computed."""
    if isinstance(model, torch.jit.ScriptModule):
        return None, "channel groups: not available for TorchScript (it carries no torch.fx graph)"
    if inputs is None:
        return None, "channel groups: need an input shape (--input-shape) to follow tensor shapes"
    try:
        if isinstance(model, fx.GraphModule):
            gm = copy_module(model)  # ShapeProp writes node metadata: leave the caller's graph alone
            ShapeProp(gm).propagate(*inputs)
        else:
            gm = capture(model, inputs)
        return _group_dicts(channel_groups(gm)), None
    except SurgeryError as e:
        return None, f"channel groups: not available for this model ({str(e).splitlines()[0]})"


def format_groups(groups: list[dict[str, Any]]) -> list[str]:
    frozen = [g for g in groups if g.get("frozen")]
    lines = [f"channel groups: {len(groups)} ({len(frozen)} frozen)"]
    for g in groups:
        state = f"FROZEN: {g['frozen']}" if g.get("frozen") else "prunable"
        lines.append(f"  group {g['id']}: {g['size']} channels, {state}")
        for key in ("producers", "locals", "readers"):
            if g.get(key):
                lines.append(f"    {key}: {', '.join(g[key])}")
    return lines
