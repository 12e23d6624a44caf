"""A picture of what was pruned: per layer, its width before and after, coloured by channel group.

Every producer of a channel group (the layers whose output channels the group holds) gets a bar:
the outline is its width before, the filled part what it keeps. Layers of one group share a colour
(they lose the same channels); a frozen group is hatched grey and its reason is listed under the
plot. ``surgery inspect --plot`` draws a model's groups (nothing removed yet), ``surgery compress
--plot`` the Shrink report.

Example::

    >>> import torch, torchvision, surgery
    >>> from passes import ChannelPrune, Shrink
    >>> x = torch.randn(1, 3, 64, 64)
    >>> small = surgery.compress(torchvision.models.resnet18(weights=None).eval(), [ChannelPrune(0.5), Shrink()], x)
    >>> plot_report(surgery.shrink_report(small), "/tmp/widths.png").name
    'widths.png'
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["plot_groups", "plot_report", "MAX_LAYERS"]

MAX_LAYERS = 200  # bars in one figure (a 1B-parameter LLM has thousands of producers): the widest shown


def plot_report(report: Any, path: str | os.PathLike, title: str = "") -> Path:
    """:func:`plot_groups` of a :class:`~surgery.shrink.ShrinkReport` (before and after Shrink)."""
    groups = [{"id": g.id, "size": g.before, "after": g.after, "producers": g.producers, "frozen": g.frozen}
              for g in report.groups]
    return plot_groups(groups, path, title or f"Shrink: parameters {report.params_before:,} -> "
                                              f"{report.params_after:,}")


def plot_groups(groups: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Bars per producer layer of `groups` (dicts with ``id``, ``size``, ``producers``, ``frozen``
    and, after pruning, ``after``), written to `path` (.png, .svg or .pdf)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    bars = [(name, g) for g in groups for name in g.get("producers", [])]
    if len(bars) > MAX_LAYERS:
        bars = sorted(bars, key=lambda b: -b[1]["size"])[:MAX_LAYERS]
        order = {id(g): i for i, g in enumerate(groups)}
        bars.sort(key=lambda b: order[id(b[1])])
    colours = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.22 * len(bars) + 1.5)))
    for row, (name, g) in enumerate(bars):
        frozen = bool(g.get("frozen"))
        colour = "0.6" if frozen else colours(g["id"] % 20)
        after = g.get("after", g["size"])
        ax.barh(row, g["size"], color="none", edgecolor=colour, linewidth=1.0)
        ax.barh(row, after, color=colour, alpha=0.85, hatch="//" if frozen else None,
                edgecolor="0.3" if frozen else None)
        ax.text(g["size"], row, f" {after}/{g['size']}" if after != g["size"] else f" {g['size']}", va="center",
                fontsize=7)
    ax.set_yticks(range(len(bars)), [f"{name}  (g{g['id']})" for name, g in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("output channels (outline: before, filled: kept)")
    shown = f"; the {MAX_LAYERS} widest of {sum(len(g.get('producers', [])) for g in groups)} layers" \
        if len(bars) == MAX_LAYERS else ""
    ax.set_title((title or "channel groups") + shown, fontsize=9)
    reasons = {}
    for g in groups:
        if g.get("frozen"):
            reasons.setdefault(str(g["frozen"])[:110], []).append(g["id"])
    handles = [Patch(facecolor="0.6", hatch="//", edgecolor="0.3",
                     label=f"frozen g{', g'.join(map(str, ids[:6]))}{'...' if len(ids) > 6 else ''}: {why}")
               for why, ids in list(reasons.items())[:8]]
    fig.tight_layout()
    if handles:  # under the axes; savefig's tight box takes it in
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=7, frameon=False)
    out = Path(path)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
